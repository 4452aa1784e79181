"""Weights & Biases as a sink of the event log, offline: files under ``RUN/wandb/``, synced later by hand."""

from __future__ import annotations

from pathlib import Path

from codex_ml.errors import CodexError
from codex_ml.tracking.events import finite_metrics

INSTALL = "pip install 'codex-ml[wandb]'"


def require_wandb() -> None:
    """Called before training starts: asking for W&B without the package is an error, not a no-op."""
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise CodexError(f"tracking.wandb=true needs the wandb package: {INSTALL}") from e


class WandbSink:
    name = "wandb"

    def __init__(self, run_dir: Path, project: str, config: dict, resume_id: str | None) -> None:
        import wandb

        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            dir=str(run_dir),
            mode="offline",
            config=config,
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        self.id = self.run.id

    def write(self, event: dict) -> None:
        metrics = finite_metrics(event)
        if metrics:
            self.run.log(metrics, step=int(event.get("step", 0)))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()
