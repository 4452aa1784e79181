"""serve.model_path: an exported Hugging Face folder serves the same greedy completions as its run."""

from __future__ import annotations

import asyncio

import pytest

from codex_ml.conf.schema import ServeCommandConfig, ServeConfig
from codex_ml.serve.generation import Choices, ChoiceSpec
from codex_ml.serve.server import build
from helpers import run_cli


def greedy(app, prompt: str) -> str:
    served = app.state.services.served

    async def go():
        spec = ChoiceSpec(served.tokenizer.encode(prompt), 12, 0.0, 1.0, 0, [], frozenset({served.tokenizer.eos_id}), None)
        choices = Choices(served, [spec], "t")
        choices.submit()
        text = ""
        async for _, event in choices.events():
            text = event.text
        return text

    return asyncio.run(go())


def test_exported_folder_serves_like_its_run(tiny_run, tmp_path):
    out = tmp_path / "hf"
    run_cli("export", f"run_dir={tiny_run}", f"out={out}")
    apps = []
    try:
        for cfg in (
            ServeCommandConfig(run_dir=str(tiny_run), device="cpu", serve=ServeConfig(keys_db=str(tmp_path / "k.db"))),
            ServeCommandConfig(device="cpu", serve=ServeConfig(model_path=str(out), keys_db=str(tmp_path / "k.db"))),
        ):
            _, app, model_id = build(cfg, quiet=True)
            apps.append((app, model_id))
        (native, native_id), (hf, hf_id) = apps
        assert (native_id, hf_id) == (tiny_run.name, "hf")
        for prompt in ("def parse_header_line(line):", "import os\n"):
            assert greedy(native, prompt) == greedy(hf, prompt)
    finally:
        for app, _ in apps:
            app.state.services.served.scheduler.stop(10)


def test_run_dir_or_model_path_not_both(tiny_run, tmp_path):
    p = run_cli("serve", f"run_dir={tiny_run}", f"serve.model_path={tmp_path}", check=False)
    assert p.returncode == 2 and "run_dir" in p.stderr and "serve.model_path" in p.stderr
    p = run_cli("serve", f"serve.keys_db={tmp_path / 'k.db'}", check=False)
    assert p.returncode == 2 and "run_dir" in p.stderr


@pytest.mark.parametrize("bad", ["serve.max_batch=0", "serve.port=70000", "serve.max_queue=-1", "serve.threads=-1"])
def test_bad_settings_fail_before_loading(tiny_run, bad):
    p = run_cli("serve", f"run_dir={tiny_run}", bad, check=False)
    assert p.returncode == 2 and bad.split("=")[0] in p.stderr and "Traceback" not in p.stderr


def test_model_threads_leave_a_core_to_the_event_loop(monkeypatch):
    from codex_ml.serve.server import serving_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert serving_threads(0) == 3 and serving_threads(2) == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert serving_threads(0) == 1  # one core: the model still gets a thread
