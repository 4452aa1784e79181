"""Data-parallel training: two CPU ranks (gloo, started by torchrun) with half the batch each train
exactly like one process with the whole batch, and only rank 0 writes the run folder; a killed
two-rank run resumes bit for bit, and a signal to one rank stops them all at one checkpoint."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import run_cli, tiny_train_args
from training.distributed_helpers import (
    complete_checkpoints,
    events,
    kill_all,
    rank_of,
    start_torchrun,
    torchrun,
    workers,
)


def train_losses(run_dir):
    events = [json.loads(line) for line in (run_dir / "metrics.ndjson").read_text().splitlines()]
    return [e["train_loss"] for e in events if e.get("event") == "train"]


def test_two_ranks_with_half_batches_equal_one_process(corpus_dir, tmp_path):
    single = tmp_path / "single"  # tiny_train_args: a batch of 4 windows
    run_cli("train", *tiny_train_args(corpus_dir, single, steps=8, extra=["training.deterministic=true"]))
    ddp = tmp_path / "ddp"
    # per rank: 2 windows; the two ranks' windows together are the single run's batch of 4
    args = tiny_train_args(corpus_dir, ddp, steps=8, extra=["training.batch_size=2", "training.deterministic=true"])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "codex_ml.cli",
            "train",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = train_losses(single), train_losses(ddp)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert proc.stdout.count("run folder:") == 1  # rank 1 trains quietly
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == sorted(p.name for p in (single / "checkpoints").iterdir())


def test_two_ranks_with_dropout_killed_and_resumed_end_bit_identical(corpus_dir, tmp_path):
    """Each rank draws its own dropout masks (seeded seed + rank): a resumed run continues every
    rank's random streams and data position, so its final weights equal an uninterrupted run's."""
    steps = 24
    extra = [
        "model.dropout=0.1",
        "training.batch_size=2",
        "training.deterministic=true",
        "training.checkpoint_every=4",
        "training.log_every=1",
        "training.sample_tokens=0",
    ]
    ref = tmp_path / "ref"
    torchrun(tiny_train_args(corpus_dir, ref, steps=steps, extra=extra), cwd=tmp_path)
    run = tmp_path / "killed"
    args = tiny_train_args(corpus_dir, run, steps=steps, extra=extra)
    rng = random.Random(0)
    with open(tmp_path / "log", "w") as log:
        p = start_torchrun(args, tmp_path, log)
        target = rng.randint(5, steps - 6)  # a random step past the first checkpoint, well before the end
        deadline = time.time() + 240
        while max((e["step"] for e in events(run, "train")), default=0) < target and time.time() < deadline:
            assert p.poll() is None, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.01)
        kill_all(p)
    killed_at = max(e["step"] for e in events(run, "train"))
    assert 4 <= killed_at < steps and complete_checkpoints(run), killed_at
    out = torchrun(args, cwd=tmp_path)
    assert "resuming from step_" in out.stdout
    a, b = complete_checkpoints(ref)[-1], complete_checkpoints(run)[-1]
    assert a.name == b.name == f"step_{steps:08d}"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    keep = ("step", "train_loss", "val_loss")
    strip = lambda rows: [{k: v for k, v in r.items() if k in keep} for r in rows if r.get("event") in ("train", "eval")]
    assert strip(events(ref)) == strip(events(run))


def test_sigterm_to_one_rank_stops_every_rank_after_one_checkpoint(corpus_dir, tmp_path):
    run = tmp_path / "run"
    args = tiny_train_args(corpus_dir, run, steps=100000, extra=["training.batch_size=2", "training.checkpoint_every=100000"])
    with open(tmp_path / "log", "w") as log:
        p = start_torchrun(args, tmp_path, log)
        deadline = time.time() + 240
        while not events(run, "train"):
            assert time.time() < deadline and p.poll() is None, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.1)
        kids = workers(p.pid)
        victim = [pid for pid in kids if rank_of(pid) == 1]
        assert len(kids) == 2 and len(victim) == 1, kids
        os.kill(victim[0], signal.SIGTERM)  # rank 1 only: rank 0 never sees a signal
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_all(p)
            raise AssertionError(
                "still running 60 s after SIGTERM to one rank: " + (tmp_path / "log").read_text()[-3000:]
            ) from None
    assert not any(Path(f"/proc/{pid}").exists() for pid in kids)
    saved = complete_checkpoints(run)
    assert len(saved) == 1, saved
    log_text = (tmp_path / "log").read_text()
    # both ranks exit 128 + SIGTERM (torchrun prints its own traceback for that); none of ours crashed
    assert "stopped by SIGTERM" in log_text and not re.search(r'File ".*codex_ml/', log_text), log_text[-3000:]
    last = events(run)[-1]
    assert last["event"] == "interrupted" and last["step"] == int(saved[0].name.split("_")[1])
