"""GRPO's test set-up: a tiny model and toy problems, and a tiny plugin package installed as a dist-info folder
on a path of its own (what pip would leave behind)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import save_tiny_hf_models

PLUGIN = '''
"""Rewards and a metric from outside codex-ml, found through entry points."""


def id_parity(*, prompts, completions, completion_ids, **columns):
    """1 for a completion whose token ids sum to an odd number: varies between completions of one prompt."""
    return [float(sum(ids) % 2) for ids in completion_ids]


def quarter(*, prompts, completions, **columns):
    return [0.25] * len(completions)


def mean_chars(*, prompts, completions, rewards, **columns):
    """The mean length of a step's completions, in characters."""
    return sum(len(c) for c in completions) / len(completions)
'''

ENTRY_POINTS = """[codex_ml.rewards]
id_parity = grpo_test_plugin:id_parity
quarter = grpo_test_plugin:quarter

[codex_ml.metrics]
mean_chars = grpo_test_plugin:mean_chars
"""


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    (root / "grpo_test_plugin.py").write_text(PLUGIN)
    info = root / "grpo_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: grpo-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def plugin_env(plugin_path) -> dict:
    """The environment of a codex-ml subprocess that has the plugin installed."""
    return {"PYTHONPATH": os.pathsep.join([str(plugin_path), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture
def plugin_installed(plugin_path, monkeypatch):
    """The plugin on this process's path (importlib.metadata reads sys.path on every call)."""
    monkeypatch.syspath_prepend(str(plugin_path))
    yield
    sys.modules.pop("grpo_test_plugin", None)


@pytest.fixture(scope="session")
def grpo_setup(tmp_path_factory, corpus_dir) -> tuple[Path, Path]:
    """A tiny Llama (converted into the native decoder by codex-ml) and four toy problems."""
    root = tmp_path_factory.mktemp("grpo")
    save_tiny_hf_models(root, ["llama"], corpus_dir, max_positions=64)
    problems = root / "problems.jsonl"
    with open(problems, "w") as f:
        for k in range(1, 5):
            test = f"def check(candidate):\n    assert candidate(1) == {1 + k}\n"
            f.write(json.dumps({"task_id": f"Toy/{k}", "prompt": f"def add_{k}(x):\n", "entry_point": f"add_{k}", "test": test}))
            f.write("\n")
    return root, problems


@pytest.fixture
def grpo_args(grpo_setup) -> Callable[..., list[str]]:
    """``grpo_args(run_dir, *overrides)``: the command line of a tiny GRPO run."""
    root, problems = grpo_setup

    def args(run: Path, *extra: str) -> list[str]:
        return [
            "model=hf",
            f"model.path={root / 'llama'}",
            f"data.paths=[{problems}]",
            f"run.dir={run}",
            "tracking.mlflow=false",
            "grpo.group_size=4",
            "training.batch_size=8",
            "grpo.max_new_tokens=8",
            "training.log_every=1",
            *extra,
        ]

    return args
