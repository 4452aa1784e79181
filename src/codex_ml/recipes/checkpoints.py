"""Recipe piece: find a run's checkpoint by name and load its model and tokenizer for inference.

A checkpoint holds one of: native weights (``model_config.json``), a Hugging Face module's weights
(``config.json``), or a LoRA adapter (``adapter_config.json``) over the base named in
``model_source.json``. Whatever it holds, ``load_checkpoint_model`` returns a plain model (adapters
merged) that ``eval.generate`` and ``export`` work with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from codex_ml.models.gpt import CONFIG_NAME, GPT, WEIGHTS_NAME, GPTConfig
from codex_ml.recipes.models import BASE_WEIGHTS, SOURCE_FILE, _load_hf_weights, load_native_weights
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


def checkpoint_source(path: Path) -> dict:
    """What the checkpoint's weights are (native, hf, hf-native; lora or not)."""
    if (path / SOURCE_FILE).exists():
        return json.loads((path / SOURCE_FILE).read_text())
    if (path / CONFIG_NAME).exists():
        return {"kind": "native", "path": None, "lora": False}
    raise CheckpointError(f"{path}: neither {SOURCE_FILE} nor {CONFIG_NAME}; not a codex-ml checkpoint")


def load_native_checkpoint(path: Path, device: torch.device, weights_name: str = WEIGHTS_NAME) -> GPT:
    """The native decoder in ``path``: its config, and weights that fit it exactly (bar a tied output head)."""
    try:
        config = GPTConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: not a native model config ({e})") from None
    model = GPT(config)
    load_native_weights(model, path, weights_name)
    return model.to(device).eval()


def _base_for_adapter(source: dict, run_dir: Path, path: Path) -> torch.nn.Module:
    """The frozen base a LoRA checkpoint adapts: a Hugging Face module, or the native decoder."""
    if source["kind"] in ("hf", "hf-native"):
        from codex_ml.models.hf import load_hf_causal_lm

        return load_hf_causal_lm(source["path"], torch.float32, torch.device("cpu"))
    if source.get("path"):
        from codex_ml.recipes.models import find_native_weights

        return load_native_checkpoint(find_native_weights(Path(source["path"])), torch.device("cpu"))
    if (path / BASE_WEIGHTS).exists():
        # a base missing a weight would merge into a model with randomly initialised layers: refuse it
        return load_native_checkpoint(path, torch.device("cpu"), weights_name=BASE_WEIGHTS)
    raise CheckpointError(f"{path}: a LoRA adapter whose base model cannot be found")


def load_checkpoint_model(run_dir: Path, path: Path, device: torch.device) -> torch.nn.Module:
    """The checkpoint's model, adapters merged: a native ``GPT`` or a Hugging Face causal LM."""
    verify_checkpoint(path)
    source = checkpoint_source(path)
    if source.get("lora"):
        from peft import PeftModel

        base = _base_for_adapter(source, run_dir, path)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()  # nosec B615  # a verified local checkpoint folder: PEFT reads its adapter from disk
        return model.to(device).eval()
    if source["kind"] == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path), local_files_only=True)  # nosec B615  # a verified local checkpoint folder, local_files_only: never the Hub
        model = AutoModelForCausalLM.from_config(config)
        _load_hf_weights(model, path)
        return model.to(device).eval()
    return load_native_checkpoint(path, device)


def load_run_model(run_dir: Path, which: str | None, device: torch.device) -> tuple[torch.nn.Module, CodeTokenizer, Path]:
    """(model, tokenizer, checkpoint folder) of a run."""
    path = find_checkpoint(run_dir, which)
    model = load_checkpoint_model(run_dir, path, device)
    tokenizer = CodeTokenizer.load(run_dir / TOKENIZER_DIR)
    return model, tokenizer, path
