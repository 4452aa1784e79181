"""Loading local Hugging Face causal LMs: checked before anything is built, never from a hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from codex_ml.errors import CodexError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# The context of a model whose config states none, and the longest window `model=hf` trains on by default
# (a long-context model's full context rarely fits a fine-tuning batch).
DEFAULT_CONTEXT = 2048


def context_length(config: object) -> int:
    """The longest sequence a model config allows: the native ``max_seq_len``, Hugging Face's
    ``max_position_embeddings`` (``n_positions`` for GPT-2), else ``DEFAULT_CONTEXT``."""
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return DEFAULT_CONTEXT


class ModelDirError(CodexError):
    """A model directory that cannot be loaded: missing, incomplete, or an unknown architecture."""


def check_model_dir(path: str | Path) -> dict:
    """The directory's config.json, once the files a causal LM needs are known to be there."""
    d = Path(path).expanduser()
    if not d.exists():
        raise ModelDirError(f"model.path {path} does not exist")
    if not d.is_dir():
        raise ModelDirError(f"model.path {path} is not a directory")
    config_path = d / "config.json"
    if not config_path.exists():
        raise ModelDirError(f"{d}: no config.json; a Hugging Face model directory holds config.json and weights")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{config_path}: not valid JSON ({e})") from None
    if "model_type" not in config:
        raise ModelDirError(f"{config_path}: no model_type")
    if not any((d / name).exists() for name in WEIGHT_FILES) and not list(d.glob("*.safetensors")):
        raise ModelDirError(f"{d}: no weights ({', '.join(WEIGHT_FILES)}); was the model saved with save_pretrained?")
    if not any((d / name).exists() for name in TOKENIZER_FILES):
        raise ModelDirError(
            f"{d}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save it next to the model with tokenizer.save_pretrained(dir)"
        )
    return config


def hf_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)  # nosec B615  # a local directory, local_files_only: never the Hub
    except ValueError as e:  # an architecture transformers does not know, or remote code not allowed
        raise ModelDirError(f"{path}: {str(e).splitlines()[0]}") from None


def load_hf_causal_lm(
    path: str | Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False
) -> PreTrainedModel:
    """``AutoModelForCausalLM`` from a local directory (offline, remote code only when asked)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(  # nosec B615  # a local directory, local_files_only: never the Hub
            str(path), local_files_only=True, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:  # unreadable or mismatched weights
        raise ModelDirError(f"{path}: cannot be loaded as a causal LM ({str(e).splitlines()[0]})") from None
    return model.to(device)  # type: ignore[arg-type]  # transformers types .to() through a decorator that loses self
