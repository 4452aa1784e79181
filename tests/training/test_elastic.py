"""Elastic restarts: under ``torchrun --max-restarts=1`` a worker SIGKILLed once a checkpoint exists
brings the job back from its last complete checkpoint, and the job ends bit-identical to an
uninterrupted two-rank run (CPU, gloo, deterministic mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from helpers import tiny_train_args
from training.distributed_helpers import TORCHRUN, complete_checkpoints, events, rank_of, torchrun, workers

STEPS = 16
EXTRA = [
    "training.batch_size=2",
    "training.deterministic=true",
    "training.checkpoint_every=4",
    "training.log_every=1",
    "training.sample_tokens=0",
]


@pytest.mark.slow
def test_a_worker_killed_under_max_restarts_comes_back_bit_identical(corpus_dir, tmp_path) -> None:
    victim_rank = 0  # the one holding the run lock and writing metrics.ndjson: the harder case
    ref = tmp_path / "ref"
    torchrun(tiny_train_args(corpus_dir, ref, steps=STEPS, extra=EXTRA), cwd=tmp_path)
    run = tmp_path / "elastic"
    args = tiny_train_args(corpus_dir, run, steps=STEPS, extra=EXTRA)
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        # the launcher itself restarts the workers: no second command from the test
        p = subprocess.Popen(
            [*TORCHRUN, "--max-restarts=1", "-m", "codex_ml.cli", "train", *args],
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 240
            while not complete_checkpoints(run) and time.time() < deadline:
                assert p.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.05)
            assert complete_checkpoints(run), "no checkpoint within 240 s"
            victims = [w for w in workers(p.pid) if rank_of(w) == victim_rank]
            assert victims, f"no worker of rank {victim_rank}: {log_path.read_text()[-2000:]}"
            os.kill(victims[0], signal.SIGKILL)
            killed_after = max(e["step"] for e in events(run, "train"))
            assert p.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out = log_path.read_text()
    assert killed_after < STEPS, "the job finished before the kill: nothing was restarted"
    assert "resuming from step_" in out, out[-3000:]
    a, b = complete_checkpoints(ref)[-1], complete_checkpoints(run)[-1]
    assert a.name == b.name == f"step_{STEPS:08d}"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    # the restarted rank 0 cut metrics.ndjson back to the checkpoint: every step is logged once
    assert [e["step"] for e in events(run, "train")] == list(range(1, STEPS + 1))
