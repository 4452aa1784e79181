"""Recipe piece: find a run's checkpoint by name and load its model and tokenizer for inference."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from codex_ml.models.gpt import CONFIG_NAME, GPT, GPTConfig
from codex_ml.recipes.models import load_native_weights
from codex_ml.runs import CHECKPOINTS_DIR, CONFIG_FILE, TOKENIZER_DIR, RunError
from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.training.checkpoint import (
    CheckpointError,
    best_checkpoint,
    checkpoint_dir_name,
    latest_complete_checkpoint,
    verify_checkpoint,
)


def find_checkpoint(run_dir: Path, which: str | None = None) -> Path:
    """``which``: None or "latest", "best" (by the run's training.best_metric), a step number, or a folder."""
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    root = run_dir / CHECKPOINTS_DIR
    if not (run_dir / CONFIG_FILE).exists() and not root.is_dir():
        raise RunError(f"{run_dir} is not a run folder (no {CONFIG_FILE}, no {CHECKPOINTS_DIR}/)")
    which = None if which is None else str(which)
    if which in (None, "latest"):
        found = latest_complete_checkpoint(root)
        if found is None:
            raise RunError(f"{run_dir} has no complete checkpoint yet")
        return found.path
    if which == "best":
        metric, mode = _best_rule(run_dir)
        found = best_checkpoint(root, metric, mode)
        if found is None:
            raise RunError(f"{run_dir}: no checkpoint has a {metric} to choose the best by")
        return found.path
    if which.isdigit():
        path = root / checkpoint_dir_name(int(which))
    else:
        path = Path(which)
        path = path if path.is_absolute() or path.exists() else root / which
    if not (path / "COMPLETE").exists():
        raise RunError(f"checkpoint {path} does not exist or is incomplete")
    return path


def _best_rule(run_dir: Path) -> tuple[str, str]:
    import yaml

    try:
        training = yaml.safe_load((run_dir / CONFIG_FILE).read_text()).get("training", {})
    except (OSError, AttributeError):
        training = {}
    return training.get("best_metric", "val_loss"), training.get("best_mode", "min")


def load_native_checkpoint(path: Path, device: torch.device) -> GPT:
    verify_checkpoint(path)
    try:
        config = GPTConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: not a native model config ({e})") from None
    model = GPT(config)
    load_native_weights(model, path)
    return model.to(device).eval()


def load_run_model(run_dir: Path, which: str | None, device: torch.device) -> tuple[GPT, CodeTokenizer, Path]:
    path = find_checkpoint(run_dir, which)
    model = load_native_checkpoint(path, device)
    tokenizer = CodeTokenizer.load(run_dir / TOKENIZER_DIR)
    return model, tokenizer, path
