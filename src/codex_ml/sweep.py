"""What a training job knows of the Hydra sweep it belongs to (none when run alone)."""

from __future__ import annotations


def sweep_context() -> tuple[str | None, dict | None]:
    """(the job's own folder, a description of the sweep) in a multirun; (None, None) otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    sweeper = hc.sweeper.get("_target_", "basic") if hasattr(hc, "sweeper") else "basic"
    info = {"sweep_dir": hc.sweep.dir, "job_num": hc.job.num, "overrides": list(hc.overrides.task),
            "sweeper": str(sweeper)}
    return hc.runtime.output_dir, info
