"""Where ``codex-ml export``, ``evaluate``, ``generate`` and ``serve`` find a run's model: the checkpoint
module (``training/checkpoint.py``) owns it; these names stay importable from here."""

from codex_ml.training.checkpoint import (
    checkpoint_source,
    find_checkpoint,
    load_checkpoint_model,
    load_native_checkpoint,
    load_run_model,
)

__all__ = ["checkpoint_source", "find_checkpoint", "load_checkpoint_model", "load_native_checkpoint", "load_run_model"]
