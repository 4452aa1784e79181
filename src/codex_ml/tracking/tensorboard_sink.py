"""TensorBoard as a sink of the event log: every numeric field as a scalar, in ``RUN/tensorboard/``."""

from __future__ import annotations

from pathlib import Path

from codex_ml.tracking.events import finite_metrics


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, event: dict) -> None:
        step = int(event.get("step", 0))
        wall = event.get("time")
        for key, value in finite_metrics(event).items():
            self.writer.add_scalar(key, value, step, walltime=wall)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
