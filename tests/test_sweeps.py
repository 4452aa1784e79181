"""Sweeps through the CLI: Optuna and the basic grid; one run folder and MLflow run per trial; the best trial named."""

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from helpers import run_cli, tiny_train_args


def sweep_args(corpus_dir: Path, root: Path, extra: list[str]) -> list[str]:
    """The tiny training config without run.dir: each trial gets its own folder under run.root."""
    args = [a for a in tiny_train_args(corpus_dir, root / "unused", steps=6) if not a.startswith("run.dir=")]
    return [*args, f"run.root={root}", *extra]


def final_metric(run: Path, key: str) -> float:
    rows = [json.loads(line) for line in (run / "metrics.ndjson").read_text().splitlines()]
    return [r for r in rows if r["event"] == "eval"][-1][key]


def test_optuna_sweep_gives_one_run_per_trial_and_names_the_best(corpus_dir, tmp_path):
    root = tmp_path / "runs"
    out = run_cli(
        "train",
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "training.lr=interval(0.0005,0.01)",
        *sweep_args(corpus_dir, root, ["tracking.mlflow=true"]),
        cwd=tmp_path,
    )
    [sweep] = root.glob("sweep-*")
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    for trial in trials:  # a normal run folder each
        assert {"config.yaml", "env.json", "metrics.ndjson", "report.html"} <= {p.name for p in trial.iterdir()}
    values = {int(t.name): final_metric(t, "val_loss") for t in trials}

    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["metric"] == "val_loss" and summary["direction"] == "minimize" and summary["varied"] == ["training.lr"]
    assert {t["job"]: t["value"] for t in summary["all_trials"]} == values
    best = summary["best"]
    assert best["value"] == min(values.values()) and best["run_dir"] == str(sweep / str(best["job"]))
    [lr] = best["varied_overrides"]
    assert lr.startswith("training.lr=") and 0.0005 <= float(lr.split("=")[1]) <= 0.01
    assert f"best trial: #{best['job']} {lr} -> val_loss" in out.stdout

    # each trial is an MLflow run in the store beside the run folders, tagged with its sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert sorted(int(r.data.tags["sweep.job"]) for r in runs) == [0, 1]
    for r in runs:
        assert r.data.tags["sweep"] == str(sweep) and r.data.tags["sweep.sweeper"] == "optuna"
        assert r.data.tags["codex_ml.run_dir"] == str(sweep / r.data.tags["sweep.job"])
        assert (
            r.data.params["training.lr"]
            == [o for o in r.data.tags["sweep.overrides"].split() if o.startswith("training.lr=")][0].split("=")[1]
        )


def test_grid_sweep_best_by_the_configured_metric_and_direction(corpus_dir, tmp_path):
    root = tmp_path / "runs"
    out = run_cli(
        "train",
        "-m",
        "training.lr=0.001,0.01",
        *sweep_args(corpus_dir, root, ["training.best_metric=val_accuracy", "training.best_mode=max"]),
        cwd=tmp_path,
    )
    [sweep] = root.glob("sweep-*")
    values = {int(t.name): final_metric(t, "val_accuracy") for t in sweep.iterdir() if t.is_dir()}
    assert sorted(values) == [0, 1]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["metric"] == "val_accuracy" and summary["direction"] == "maximize"
    assert summary["best"]["value"] == max(values.values()) == values[summary["best"]["job"]]
    assert summary["best"]["varied_overrides"] in (["training.lr=0.001"], ["training.lr=0.01"])
    assert "best trial: #" in out.stdout and not (root / "mlflow.db").exists()
