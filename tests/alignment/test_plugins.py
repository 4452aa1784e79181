"""Plugins: rewards, metrics and data sources found by name through entry points, and used from the config."""

from __future__ import annotations

import json

import pytest

from codex_ml import plugins
from codex_ml.conf.schema import ConfigError, DataConfig, validate_data
from codex_ml.data.sources import RawDocument, open_source
from helpers import run_cli


def test_an_installed_plugin_is_found_by_name(plugin_installed):
    assert plugins.rewards.names()[:4] == ["execution", "execution_fraction", "format", "length"]  # built-ins first
    assert {"id_parity", "quarter"} <= set(plugins.rewards.names()) and "mean_chars" in plugins.metrics.names()
    quarter = plugins.rewards.get("quarter")
    assert quarter(prompts=["a", "b"], completions=["x", "y"], task_id=["t", "t"]) == [0.25, 0.25]
    mean_chars = plugins.metrics.get("mean_chars")
    assert plugins.call_metric(mean_chars, "mean_chars", ["p", "p"], ["ab", "abcd"], {"rewards": [1.0, 0.0]}) == 3.0


def test_an_unknown_name_lists_every_available_one(plugin_installed):
    with pytest.raises(plugins.PluginError) as e:
        plugins.rewards.get("no_such_reward")
    message = str(e.value)
    assert "no_such_reward" in message and all(n in message for n in ("execution", "length", "id_parity", "quarter"))
    with pytest.raises(plugins.PluginError, match="grpo.metrics: unknown metric 'nope'; available: distinct_1, distinct_2"):
        plugins.check_names(plugins.metrics, ["distinct_2", "nope"], "grpo.metrics")


class _Numbers:
    """A plugin data source: one document per integer, text made on the fly."""

    description = "numbers"

    def __init__(self, paths, patterns, text_field, id_field):
        self.n = int(paths[0])

    def fingerprint(self) -> str:
        return f"numbers-{self.n}"

    def __iter__(self):
        for i in range(self.n):
            text = f"def f_{i}():\n    return {i}\n"
            yield RawDocument(f"n{i}", text, len(text))


def test_a_plugin_data_source_is_resolved_through_the_registry():
    factory = lambda *, paths, patterns, text_field, id_field: _Numbers(paths, patterns, text_field, id_field)
    plugins.data_sources.register("numbers", factory)
    try:
        validate_data(DataConfig(source="numbers", paths=["3"]))
        source = open_source("numbers", ["3"], ["*.py"], "text", None)
        assert [d.id for d in source] == ["n0", "n1", "n2"] and source.fingerprint() == "numbers-3"
    finally:
        plugins.data_sources.unregister("numbers")
    with pytest.raises(ConfigError, match=r"data.source: must be one of stdlib, files, jsonl, hf_disk, sft; got 'numbers'"):
        validate_data(DataConfig(source="numbers", paths=["3"]))


def test_a_plugin_that_breaks_its_interface_is_named():
    plugins.rewards.register("bad_reward", lambda **kw: [0.5])  # one value for any number of completions
    plugins.data_sources.register("bad_source", lambda **kw: object())
    try:
        from codex_ml.rl.scoring import RewardScorer

        scorer = RewardScorer({"bad_reward": plugins.rewards.get("bad_reward")}, [])
        with pytest.raises(plugins.PluginError, match="bad_reward.*1 values for 2 completions"):
            scorer(["p", "p"], ["a", "b"], {})
        with pytest.raises(plugins.PluginError, match="bad_source.*without 'description'"):
            open_source("bad_source", [], [], "text", None)
    finally:
        plugins.rewards.unregister("bad_reward")
        plugins.data_sources.unregister("bad_source")


@pytest.mark.slow
def test_the_plugins_reward_and_metric_are_used_by_name_from_the_config(grpo_args, tmp_path, plugin_env):
    run = tmp_path / "run"
    refused = run_cli("grpo", *grpo_args(run, "grpo.rewards=[missing]"), env=plugin_env, check=False)
    assert refused.returncode == 2 and "quarter" in refused.stderr and "execution" in refused.stderr and not run.exists()
    args = [
        "grpo.rewards=[quarter,format]",
        "grpo.reward_weights=[1.0,0.0]",
        "grpo.metrics=[mean_chars,distinct_1]",
        "training.max_steps=2",
    ]
    run_cli("grpo", *grpo_args(run, *args), env=plugin_env)
    train = [r for r in map(json.loads, (run / "metrics.ndjson").read_text().splitlines()) if r.get("event") == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["rewards/quarter/mean"] == pytest.approx(0.25) and r["reward"] == pytest.approx(0.25)  # format weighs 0
        assert r["metrics/mean_chars"] > 0 and 0 <= r["metrics/distinct_1"] <= 1
        assert r["frac_reward_zero_std"] == 1.0 and r["reward_std"] == 0.0  # every completion got 0.25
