"""LoRA through PEFT, for native and Hugging Face models, saved in PEFT's own format.

Adapters of a model loaded from a Hugging Face directory are saved under Hugging Face's module
names even when training ran on the native decoder (a Llama checkpoint converted exactly), so that
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)`` loads them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from codex_ml.errors import CodexError
from codex_ml.models.convert import to_hf_name, to_native_name

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def require_peft():
    try:
        import peft
    except ImportError as e:
        raise CodexError("lora.enabled=true needs the peft package: pip install peft") from e
    return peft


def adaptable_modules(model: torch.nn.Module) -> set[str]:
    """Last name components of the layers PEFT's LoRA can wrap (Linear, and GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D)
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, kinds) and name}


def apply_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str],
               causal_lm: bool):
    """Wrap ``model`` with LoRA adapters; every name in ``target_modules`` must match some layer."""
    peft = require_peft()
    available = adaptable_modules(model)
    unmatched = [t for t in target_modules if t not in available]
    if unmatched:
        raise CodexError(f"lora.target_modules: {', '.join(unmatched)} match no linear layer of the model; "
                         f"its adaptable layers are: {', '.join(sorted(available))}")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                             bias="none", task_type="CAUSAL_LM" if causal_lm else None)
    return peft.get_peft_model(model, config)


def adapter_files(peft_model, hf_names: bool, base_path: str | None) -> dict[str, bytes]:
    """The adapter as PEFT saves it (weights and config), under Hugging Face names when asked."""
    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        weights = load_st((Path(tmp) / ADAPTER_WEIGHTS).read_bytes())
        config = json.loads((Path(tmp) / ADAPTER_CONFIG).read_text())
    if hf_names:
        weights = {_rename(k, to_hf_name): v for k, v in weights.items()}
        config["task_type"] = "CAUSAL_LM"
    config["base_model_name_or_path"] = str(Path(base_path).resolve()) if base_path else None
    return {
        ADAPTER_WEIGHTS: save_st({k: v.contiguous() for k, v in weights.items()}, metadata={"format": "pt"}),
        ADAPTER_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }


def load_adapter(peft_model, directory: Path, hf_names: bool) -> None:
    """Load adapter weights saved by ``adapter_files`` into a LoRA-wrapped model (for resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load as load_st

    weights = load_st((directory / ADAPTER_WEIGHTS).read_bytes())
    if hf_names:
        weights = {_rename(k, to_native_name): v for k, v in weights.items()}
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CodexError(f"{directory / ADAPTER_WEIGHTS}: does not fit the model (unexpected {unexpected[:3]})")


def _rename(key: str, fn) -> str:
    return _PREFIX + fn(key[len(_PREFIX):]) if key.startswith(_PREFIX) else key
