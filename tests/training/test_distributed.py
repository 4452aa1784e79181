"""Data-parallel training: two CPU ranks (gloo, started by torchrun) with half the batch each train
exactly like one process with the whole batch, and only rank 0 writes the run folder."""

import json
import os
import subprocess
import sys

from helpers import run_cli, tiny_train_args


def train_losses(run_dir):
    events = [json.loads(line) for line in (run_dir / "metrics.ndjson").read_text().splitlines()]
    return [e["train_loss"] for e in events if e.get("event") == "train"]


def test_two_ranks_with_half_batches_equal_one_process(corpus_dir, tmp_path):
    single = tmp_path / "single"  # tiny_train_args: a batch of 4 windows
    run_cli("train", *tiny_train_args(corpus_dir, single, steps=8, extra=["training.deterministic=true"]))
    ddp = tmp_path / "ddp"
    # per rank: 2 windows; the two ranks' windows together are the single run's batch of 4
    args = tiny_train_args(corpus_dir, ddp, steps=8, extra=["training.batch_size=2", "training.deterministic=true"])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "codex_ml.cli", "train", *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = train_losses(single), train_losses(ddp)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert proc.stdout.count("run folder:") == 1  # rank 1 trains quietly
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == sorted(
        p.name for p in (single / "checkpoints").iterdir())
