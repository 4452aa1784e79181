"""Helpers for the tests: a small real-code corpus, tiny configs, and running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "codex_ml.cli"]

# A model small enough to train in seconds on CPU.
TINY_MODEL = [
    "model=tiny",
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=2",
    "model.n_kv_head=1",
    "model.d_ff=64",
    "model.max_seq_len=64",
]


def stdlib_sample(n: int = 40) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 30_000)
    return files[:n]


def data_args(corpus: Path, seq_len: int = 32, vocab: int = 400) -> list[str]:
    return [
        "data.source=files",
        f"data.paths=[{corpus}]",
        f"data.seq_len={seq_len}",
        "data.num_workers=0",
        f"tokenizer.vocab_size={vocab}",
    ]


def tiny_train_args(corpus: Path, run_dir: Path, steps: int = 12, extra: list[str] | None = None) -> list[str]:
    return [
        *TINY_MODEL,
        *data_args(corpus),
        f"run.dir={run_dir}",
        f"training.max_steps={steps}",
        "training.batch_size=4",
        "training.log_every=2",
        "training.checkpoint_every=4",
        "training.eval_batches=2",
        "training.warmup_steps=2",
        "training.sample_tokens=8",
        "tracking.mlflow=false",
        *(extra or []),
    ]


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"codex-ml {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
