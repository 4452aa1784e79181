"""What a training job knows of the Hydra sweep it belongs to (none when run alone)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig


def sweep_context() -> tuple[str | None, dict | None]:
    """(the job's own folder, a description of the sweep) in a multirun; (None, None) otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    info = {
        "sweep_dir": hc.sweep.dir,
        "job_num": hc.job.num,
        "overrides": list(hc.overrides.task),
        "sweeper": sweeper_name(hc.sweeper),
    }
    return hc.runtime.output_dir, info


def sweeper_name(sweeper_config: DictConfig | None) -> str:
    """``basic``, ``optuna``, ...: the sweeper plugin's class name without "Sweeper"."""
    target = str(sweeper_config.get("_target_", "")) if sweeper_config is not None else ""
    name = target.rsplit(".", 1)[-1].lower().removesuffix("sweeper")
    return name or "basic"
