"""Runs shared by the tracking tests, each trained once per session through the real CLI.

``tracked_run``: MLflow (the embedded store, with the final checkpoint), TensorBoard and system metrics
every 0.1 s; trained to step 8, then resumed to step 12 in a second process. ``repro_runs``: two
deterministic runs of one config and seed with ``tracking.mlflow=false``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import run_cli, tiny_train_args

TRACKED_ARGS = [
    "tracking.mlflow=true",
    "tracking.tensorboard=true",
    "tracking.system_every_s=0.1",
    "tracking.log_model=true",
    "training.lr=0.003",
]


@dataclass
class TrackedRun:
    path: Path  # the run folder
    store_uri: str  # the embedded MLflow store beside it
    first_run_id: str  # the MLflow run the first process created
    outputs: list[str]  # stdout and stderr of each of the two processes


@pytest.fixture(scope="session")
def tracked_run(corpus_dir, tmp_path_factory) -> TrackedRun:
    root = tmp_path_factory.mktemp("tracked")
    run = root / "runs" / "tracked"
    env = {"XDG_CACHE_HOME": str(root / "cache")}
    outputs = []
    first = run_cli("train", *tiny_train_args(corpus_dir, run, steps=8, extra=TRACKED_ARGS), env=env)
    outputs.append(first.stdout + first.stderr)
    first_run_id = json.loads((run / "mlflow_run.json").read_text())["mlflow_run_id"]
    second = run_cli("train", *tiny_train_args(corpus_dir, run, steps=12, extra=TRACKED_ARGS), env=env)
    outputs.append(second.stdout + second.stderr)
    return TrackedRun(run, f"sqlite:///{root / 'runs' / 'mlflow.db'}", first_run_id, outputs)


@pytest.fixture(scope="session")
def repro_runs(corpus_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repro")
    env = {"XDG_CACHE_HOME": str(root / "cache")}
    runs = (root / "runs" / "r1", root / "runs" / "r2")
    for run in runs:
        run_cli(
            "train",
            *tiny_train_args(corpus_dir, run, steps=12, extra=["training.deterministic=true", "training.seed=5"]),
            env=env,
        )
    return runs
