"""Helpers for the multi-process tests: torchrun launches of the CLI, its workers, the run's outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # read at the call: the test's isolated cache


def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`codex-ml train ARGS` on two gloo ranks; fails the test with the output when it fails."""
    proc = subprocess.run(
        [*TORCHRUN, "-m", "codex_ml.cli", "train", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env()
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start_torchrun(args: list[str], cwd: Path, log) -> subprocess.Popen:
    return subprocess.Popen(
        [*TORCHRUN, "-m", "codex_ml.cli", "train", *args],
        cwd=cwd,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def workers(pid: int) -> list[int]:
    """The processes torchrun started (its children)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker at once: what a lost node does."""
    kids = workers(proc.pid)
    for pid in [proc.pid, *kids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = run_dir / "metrics.ndjson"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in rows if kind is None or r.get("event") == kind]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))
