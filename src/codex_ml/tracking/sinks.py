"""Which trackers a run feeds: attached to the event log, off the training loop's thread."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from omegaconf import OmegaConf

from codex_ml.tracking.events import EventLog, Sink

if TYPE_CHECKING:
    from codex_ml.conf.schema import TrainConfig
    from codex_ml.tracking.system import SystemMonitor
    from codex_ml.tracking.tensorboard_sink import TensorBoardSink
    from codex_ml.tracking.wandb_sink import WandbSink


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Trackers:
    """The sinks attached to a run's event log, the system monitor, and what happens at the end."""

    def __init__(self, sinks: list[Sink], monitor: SystemMonitor | None = None, log: Callable[[str], None] = print) -> None:
        self.sinks, self.monitor, self.log = sinks, monitor, log

    def finish(self, run_dir: Path, interrupted: bool, final_checkpoint: Path | None = None) -> None:
        """Stop sampling, write ``RUN/report.html`` from metrics.ndjson, then let each sink send what it has left.

        Call it after the event log is flushed. The report comes before the sinks' own ends because
        MLflow uploads it as an artifact; a report that cannot be written is a warning, like a tracker fault.
        """
        if self.monitor is not None:
            self.monitor.stop()
        self._write_report(run_dir)
        for sink in self.sinks:
            finish = getattr(sink, "finish", None)
            if finish is not None:
                finish(run_dir, interrupted, final_checkpoint)

    def _write_report(self, run_dir: Path) -> None:
        from codex_ml.errors import CodexError
        from codex_ml.tracking.report import write_report

        try:
            self.log(f"report: {write_report(run_dir)}")
        except CodexError as e:  # e.g. stopped before the first logged step: nothing to plot yet
            self.log(f"no report: {e}")
        except Exception as e:  # the report is a view of metrics.ndjson; never fail a finished run over it
            warn(
                f"warning: could not write {run_dir / 'report.html'} ({e.__class__.__name__}: {e}); "
                f"`codex-ml report run_dir={run_dir}` retries it"
            )


def mlflow_location(cfg: TrainConfig, run_dir: Path) -> tuple[str, Path | None]:
    """The tracking URI, and where artifacts go for the embedded store (None for a server)."""
    from codex_ml.tracking.mlflow_sink import default_uri

    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri, None
    # beside the run folders: the run's parent for run.dir, else run.root (also for sweep jobs)
    root = run_dir.parent if cfg.run.dir else Path(cfg.run.root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return default_uri(root), root / "mlartifacts"


def start_trackers(
    cfg: TrainConfig,
    run_dir: Path,
    events: EventLog,
    env: dict,
    sweep: dict | None,
    current_step: Callable[[], int],
    log: Callable[[str], None],
) -> Trackers:
    """Attach the sinks ``cfg.tracking`` asks for; each one that fails to start is reported and skipped."""
    import codex_ml

    t = cfg.tracking
    # a structured config converts to a dict; the stubs type every container kind
    config = cast(dict, OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    sinks: list[Sink | None] = []
    if t.mlflow:
        from codex_ml.tracking.mlflow_sink import MlflowSink

        uri, artifacts = mlflow_location(cfg, run_dir)
        tags = {
            "codex_ml.version": codex_ml.__version__,
            "codex_ml.run_dir": str(run_dir),
            "git_commit": str(env.get("git_commit")),
            "workdir_git_commit": str(env.get("workdir_git", {}).get("commit")),
        }
        run_name = run_dir.name
        if sweep:
            sweep_dir = Path(sweep["sweep_dir"]).resolve()
            tags.update(
                {
                    "sweep": str(sweep_dir),
                    "sweep.job": str(sweep["job_num"]),
                    "sweep.sweeper": sweep["sweeper"],
                    "sweep.overrides": " ".join(sweep["overrides"])[:5000],
                }
            )
            run_name = f"{sweep_dir.name}-{sweep['job_num']}"
        sinks.append(MlflowSink(uri, t.experiment, run_dir, config, tags, artifacts, t.log_model, warn, run_name))
        log(f"tracking: MLflow at {uri}")
    if t.tensorboard:
        sinks.append(_started("tensorboard", lambda: _tensorboard(run_dir)))
    if t.wandb:
        sinks.append(_started("wandb", lambda: _wandb(run_dir, t.experiment, config)))
    started = [s for s in sinks if s is not None]
    for sink in started:
        events.add_sink(sink)
    from codex_ml.tracking.system import SystemMonitor

    monitor = SystemMonitor(t.system_every_s, events.log, current_step, log)
    return Trackers(started, monitor, log)


def _started(name: str, build: Callable[[], Sink]) -> Sink | None:
    try:
        return build()
    except Exception as e:  # a tracker that cannot start never stops training
        warn(f"warning: tracker {name} could not start ({e.__class__.__name__}: {e}); training goes on without it")
        return None


def _tensorboard(run_dir: Path) -> TensorBoardSink:
    from codex_ml.tracking.tensorboard_sink import TensorBoardSink

    return TensorBoardSink(run_dir / "tensorboard")


def _wandb(run_dir: Path, project: str, config: dict) -> WandbSink:
    import json

    from codex_ml.tracking.wandb_sink import WandbSink

    record_path = run_dir / "wandb_run.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    sink = WandbSink(run_dir, project, config, record.get("wandb_run_id"))
    record["wandb_run_id"] = sink.id
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return sink
