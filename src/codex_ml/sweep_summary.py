"""The end of a Hydra sweep: every trial's overrides and metric, and the best trial, written and printed.

Registered as a Hydra callback in ``conf/hydra_settings.yaml``, so it serves the basic grid sweeper
and the Optuna sweeper alike. Each job of a ``codex-ml train -m`` sweep returns the final value of
``training.best_metric``; the best trial is the lowest one (or the highest: ``hydra.sweeper.direction``
for Optuna, ``training.best_mode`` for a grid). ``SWEEP_DIR/sweep_summary.json`` holds the whole table.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from hydra.core.utils import JobReturn

SUMMARY_FILE = "sweep_summary.json"


class SweepSummary(Callback):
    """Collects each job's result as it ends (jobs run in this process with Hydra's default launcher)."""

    def __init__(self) -> None:
        self.trials: list[dict] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.trials = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        failed = job_return.status != JobStatus.COMPLETED
        value = None if failed else job_return.return_value
        trial = {
            "job": int(config.hydra.job.num),
            "overrides": list(job_return.overrides or []),
            "value": float(value) if _is_number(value) else None,
            "status": "failed" if failed else "completed",
            "job_dir": str(config.hydra.runtime.output_dir),
            "run_dir": _run_dir(config),
            "metric": OmegaConf.select(config, "training.best_metric"),
            "best_mode": OmegaConf.select(config, "training.best_mode"),
            "direction": _direction(config),
        }
        if failed:
            trial["error"] = f"{job_return._return_value.__class__.__name__}: {job_return._return_value}"
        self.trials.append(trial)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not any(t["metric"] or t["value"] is not None for t in self.trials):
            return  # a sweep of a command that returns no metric (prepare, evaluate, ...)
        summary = summarize(self.trials, sweep_dir=_sweep_dir(config, self.trials))
        path = Path(summary["sweep_dir"]) / SUMMARY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)
        for line in summary_lines(summary):
            print(line, flush=True)
        print(f"sweep summary: {path}", flush=True)


def summarize(trials: list[dict], sweep_dir: str) -> dict:
    """The table of trials, the overrides that vary between them, and the best trial by the sweep's direction."""
    direction = trials[0]["direction"]
    metric = trials[0]["metric"] or "the returned value"
    finite = [t for t in trials if t["value"] is not None and math.isfinite(t["value"])]
    best = (min if direction == "minimize" else max)(finite, key=lambda t: t["value"]) if finite else None
    varied = _varied_keys(trials)
    notes = []
    if trials[0]["best_mode"] and {"min": "minimize", "max": "maximize"}[trials[0]["best_mode"]] != direction:
        mode = trials[0]["best_mode"]
        notes.append(
            f"the sweep's direction is {direction} but training.best_mode={mode}: best-k checkpoints and early "
            f"stopping rank {metric} the other way; set training.best_mode={'max' if mode == 'min' else 'min'} "
            "to agree"
        )
    return {
        "sweep_dir": sweep_dir,
        "metric": metric,
        "direction": direction,
        "trials": len(trials),
        "completed": sum(t["status"] == "completed" for t in trials),
        "varied": varied,
        "best": None
        if best is None
        else {
            "job": best["job"],
            "value": best["value"],
            "run_dir": best["run_dir"],
            "overrides": best["overrides"],
            "varied_overrides": [o for o in best["overrides"] if o.split("=", 1)[0] in varied] or best["overrides"],
        },
        "notes": notes,
        "all_trials": trials,
    }


def summary_lines(summary: dict) -> list[str]:
    lines = [f"sweep: {summary['trials']} trials ({summary['completed']} completed), {summary['direction']} {summary['metric']}"]
    best = summary["best"]
    if best is None:
        lines.append(f"best trial: none (no trial reported a finite {summary['metric']})")
    else:
        lines.append(
            f"best trial: #{best['job']} {' '.join(best['varied_overrides'])} -> "
            f"{summary['metric']} {best['value']:.6g}; run folder {best['run_dir'] or '?'}"
        )
    lines += [f"note: {n}" for n in summary["notes"]]
    return lines


def _direction(config: DictConfig) -> str:
    """Optuna's ``hydra.sweeper.direction``; for a grid, ``training.best_mode`` (min unless told)."""
    direction = OmegaConf.select(config, "hydra.sweeper.direction")
    if direction is not None:
        if OmegaConf.is_list(direction) or isinstance(direction, (list, tuple)):
            direction = direction[0]
        name = str(getattr(direction, "name", direction)).lower()
        return "maximize" if "max" in name else "minimize"
    return "maximize" if OmegaConf.select(config, "training.best_mode") == "max" else "minimize"


def _run_dir(config: DictConfig) -> str | None:
    """Where the train command put this trial's run folder (see ``runs.resolve_run_dir``)."""
    from codex_ml.runs import resolve_run_dir

    run = OmegaConf.select(config, "run")
    if run is None:
        return None
    return str(resolve_run_dir(run.root, run.name, run.dir, str(config.hydra.runtime.output_dir)))


def _sweep_dir(config: DictConfig, trials: list[dict]) -> str:
    parents = {str(Path(t["job_dir"]).parent) for t in trials}
    if len(parents) == 1:
        return parents.pop()
    return str(Path(str(config.hydra.sweep.dir)).resolve())


def _varied_keys(trials: list[dict]) -> list[str]:
    """The override keys whose value is not the same in every trial."""
    per_trial = [dict(o.split("=", 1) for o in t["overrides"] if "=" in o) for t in trials]
    keys = list(dict.fromkeys(k for d in per_trial for k in d))
    return [k for k in keys if len({d.get(k) for d in per_trial}) > 1]


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
