"""Jobs: overrides checked by the CLI's schema, paths confined to the data root and the runs root, a real
training job run by a worker, cancelled with a checkpoint, and resumed after the server dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from codex_ml.serve.errors import ApiError
from codex_ml.serve.jobs import JobManager
from helpers import TINY_MODEL, stdlib_sample


@pytest.fixture
def roots(tmp_path):
    data = tmp_path / "data"
    (data / "code").mkdir(parents=True)
    for p in stdlib_sample(12):
        (data / "code" / p.name).write_bytes(p.read_bytes())
    (data / "escape").symlink_to("/etc")
    return tmp_path, data, tmp_path / "runs"


def overrides(data: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [
        *TINY_MODEL,
        f"training.max_steps={steps}",
        "data.source=files",
        f"data.paths=[{data}]",
        "data.seq_len=32",
        "data.num_workers=0",
        "tokenizer.vocab_size=300",
        "training.batch_size=4",
        "training.eval_every=0",
        "training.sample_tokens=0",
        "tracking.mlflow=false",
        f"run.name={name}",
        *extra,
    ]


def refused(manager, command, ov) -> str:
    with pytest.raises(ApiError) as e:
        manager.validate(command, ov)
    assert e.value.status == 400
    return e.value.message


def test_overrides_are_checked_and_paths_confined(roots):
    tmp, data, runs = roots
    m = JobManager(tmp / "state", runs_root=str(runs), data_root=str(data))
    final, run_dir, steps = m.validate("train", overrides(data / "code", "ok", 5))
    assert run_dir == (runs / "ok").resolve() and steps == 5 and f"run.root={runs.resolve()}" in final
    assert "no_such_key" in refused(m, "train", overrides(data / "code", "x", 5, "training.no_such_key=3"))
    assert "training.lr" in refused(m, "train", overrides(data / "code", "x", 5, "training.lr=-1"))
    assert "data_root" in refused(m, "train", overrides(Path("/etc"), "x", 5))
    assert ".." in refused(m, "train", overrides(f"{data}/code/../..", "x", 5))
    assert "data_root" in refused(m, "train", overrides(data / "escape", "x", 5))
    assert "runs root" in refused(m, "train", overrides(data / "code", "x", 5, f"run.dir={tmp / 'outside'}"))
    assert "run.name" in refused(m, "train", overrides(data / "code", "../escaped", 5))
    assert "runs root" in refused(m, "train", overrides(data / "code", "x", 5, "run.root=/tmp"))
    assert "not allowed" in refused(m, "train", overrides(data / "code", "x", 5, "tracking.mlflow_uri=sqlite:////tmp/x.db"))
    assert "not allowed" in refused(m, "train", [*overrides(data / "code", "x", 5), "hydra.run.dir=/tmp"])
    (data / "code" / "link.py").symlink_to("/etc/passwd")  # a file inside the data root that points out of it
    assert "symlink" in refused(m, "train", overrides(data / "code", "x", 5))
    assert "runs root" in refused(m, "evaluate", ["run_dir=/etc"])
    assert "checkpoint" in refused(m, "evaluate", [f"run_dir={runs}/ok", "checkpoint=/etc"])
    assert JobManager(tmp / "s2", runs_root=str(runs), data_root=None) and "data_root" in refused(
        JobManager(tmp / "s2", runs_root=str(runs), data_root=None), "train", overrides(data / "code", "x", 5)
    )


def wait(manager, job_id, states, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        job = manager.get(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {manager.get(job_id)['state']}; logs: {manager.logs(job_id)[-800:]}")


def checkpoints(run: Path) -> list[str]:
    return sorted(p.parent.name for p in (run / "checkpoints").glob("step_*/COMPLETE"))


@pytest.mark.slow
def test_a_training_job_is_cancelled_with_a_checkpoint_and_resumes_after_a_crash(roots, monkeypatch):
    tmp, data, runs = roots
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp)
    m = JobManager(tmp / "state", runs_root=str(runs), data_root=str(data))
    m.start()
    try:
        job = m.submit("train", overrides(data / "code", "cancel-me", 5000, "training.checkpoint_every=1000"))
        wait(m, job["id"], {"running"})
        end = time.time() + 240
        while (
            not (runs / "cancel-me" / "metrics.ndjson").exists()
            or "train_loss" not in (runs / "cancel-me" / "metrics.ndjson").read_text()
        ):
            assert time.time() < end, m.logs(job["id"])[-500:]
            time.sleep(0.5)
        assert m.cancel(job["id"])["state"] == "cancelling"
        done = wait(m, job["id"], {"cancelled", "failed", "succeeded"})
        assert done["state"] == "cancelled" and checkpoints(runs / "cancel-me")  # SIGTERM: training checkpointed
        assert done["progress"]["step"] >= 1 and "train_loss" in done["last_metrics"]

        job = m.submit("train", overrides(data / "code", "crash", 5000, "training.checkpoint_every=5"))
        end = time.time() + 240
        while not checkpoints(runs / "crash"):
            assert time.time() < end and m.get(job["id"])["state"] in ("queued", "running"), m.logs(job["id"])[-500:]
            time.sleep(0.5)
    finally:
        m._stopping = True  # the server "dies": its worker is killed, nothing more is written to the jobs table
        if m._process is not None:
            os.kill(m._process.pid, signal.SIGKILL)
            m._thread.join(30)
    at_crash = checkpoints(runs / "crash")
    assert m.get(job["id"])["state"] in ("running", "queued")  # whether the runner saw its worker die or not
    restarted = JobManager(tmp / "state", runs_root=str(runs), data_root=str(data))
    restarted.start()
    try:
        end = time.time() + 240
        while not [c for c in checkpoints(runs / "crash") if c > at_crash[-1]]:
            assert time.time() < end, restarted.logs(job["id"])[-800:]
            time.sleep(0.5)
        job = restarted.get(job["id"])
        assert job["state"] == "running" and job["attempts"] == 2 and job["note"]
        assert "resum" in restarted.logs(job["id"]).lower()
    finally:
        restarted.cancel(job["id"])
        wait(restarted, job["id"], {"cancelled"}, timeout=120)
        restarted.shutdown()
