"""LoRA through PEFT, for native and Hugging Face models, saved in PEFT's own format.

Adapters of a model loaded from a Hugging Face directory are saved under Hugging Face's module
names even when training ran on the native decoder (a Llama checkpoint converted exactly), so that
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)`` loads them.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from peft import set_peft_model_state_dict
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from transformers.pytorch_utils import Conv1D

from codex_ml.errors import CodexError
from codex_ml.models.convert import to_hf_name, to_native_name

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def adaptable_modules(model: torch.nn.Module) -> set[str]:
    """Last name components of the layers PEFT's LoRA can wrap (Linear, and GPT-2's Conv1D)."""
    return {name.rsplit(".", 1)[-1] for name, _ in _linear_layers(model)}


@dataclass(frozen=True)
class LoraTargets:
    """The modules LoRA adapts (as PEFT's ``target_modules``), the rule that chose them, the layers they match."""

    names: list[str]
    rule: str
    layers: list[str]  # full names of the layers the names match

    def describe(self) -> str:
        """One line for the run's log: which layers (by last name component), how many, and why."""
        kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in self.layers))
        return f"{', '.join(kinds)} ({len(self.layers)} layers; {self.rule})"


def resolve_target_modules(model: torch.nn.Module, requested: list[str] | None, model_type: str | None) -> LoraTargets:
    """The modules to adapt: ``requested`` when given, else the architecture's default, PEFT's own rule.

    PEFT's rule, as ``LoraConfig(target_modules=None)`` and its ``"all-linear"`` apply it: its
    per-architecture list when it knows ``model_type`` (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``:
    ``c_attn`` for GPT-2, ``query_key_value`` for GPT-NeoX, Falcon and BLOOM, ``q_proj, v_proj`` for
    Llama and Qwen2, ...), else every Linear/Conv1D layer but the output head (``all-linear``). The
    native decoder has no Hugging Face model type, so it gets all-linear: its seven projections per block.
    A name, requested or default, that matches no adaptable layer is an error.
    """
    if requested:
        _refuse_unmatched(model, requested)
        return LoraTargets(list(requested), "lora.target_modules", _matched_layers(model, requested))
    known = PEFT_DEFAULTS.get(model_type) if model_type else None
    if isinstance(known, str):  # a regular expression over full module names (PEFT's fullmatch)
        names = [name for name, _ in _linear_layers(model) if re.fullmatch(known, name)]
        rule = f"PEFT's default for {model_type}"
    elif known:
        names, rule = list(known), f"PEFT's default for {model_type}"
    else:
        head = _output_head(model)
        # full names, as PEFT's all-linear writes them: a head sharing a last name component stays out
        names = [name for name, layer in _linear_layers(model) if layer is not head]
        why = f"PEFT has no default for {model_type}" if model_type else "the native decoder"
        rule = f"all-linear: every Linear/Conv1D but the output head, {why}"
    unmatched = _unmatched(model, names) if names else ["no layer"]
    if unmatched:
        raise CodexError(
            f"lora: {rule} ({', '.join(unmatched)}) matches no linear layer of this "
            f"{model_type or 'model'}; name the layers to adapt with lora.target_modules=[...] "
            f"(its adaptable layers are: {', '.join(sorted(adaptable_modules(model)))})"
        )
    return LoraTargets(names, rule, _matched_layers(model, names))


def apply_lora(
    model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str], causal_lm: bool
) -> peft.PeftModel:
    """Wrap ``model`` with LoRA adapters; every name in ``target_modules`` must match some layer.

    ``target_modules`` as ``resolve_target_modules`` gives them: last name components or full names.
    """
    _refuse_unmatched(model, target_modules)
    # GPT-2's Conv1D stores its weight transposed: say so, rather than let PEFT correct it with a warning
    layers = dict(_linear_layers(model))
    conv1d = all(isinstance(layers[name], Conv1D) for name in _matched_layers(model, target_modules))
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM" if causal_lm else None,
    )
    return peft.get_peft_model(model, config)


def _linear_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if name and isinstance(m, (torch.nn.Linear, Conv1D))]


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the full name, or its trailing components."""
    return name == target or name.endswith("." + target)


def _matched_layers(model: torch.nn.Module, targets: list[str]) -> list[str]:
    return [name for name, _ in _linear_layers(model) if any(_matches(name, t) for t in targets)]


def _unmatched(model: torch.nn.Module, targets: list[str]) -> list[str]:
    names = [name for name, _ in _linear_layers(model)]
    return [t for t in targets if not any(_matches(name, t) for name in names)]


def _refuse_unmatched(model: torch.nn.Module, targets: list[str]) -> None:
    unmatched = _unmatched(model, targets) if targets else ["an empty list"]
    if unmatched:
        raise CodexError(
            f"lora.target_modules: {', '.join(unmatched)} match no linear layer of the model; "
            f"its adaptable layers are: {', '.join(sorted(adaptable_modules(model)))}"
        )


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The projection onto the vocabulary: all-linear leaves it out (it is tied to the embeddings in many models)."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else getattr(model, "lm_head", None)


def adapter_files(peft_model: peft.PeftModel, hf_names: bool, base_path: str | None) -> dict[str, bytes]:
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


def load_adapter(peft_model: peft.PeftModel, directory: Path, hf_names: bool) -> None:
    """Load adapter weights saved by ``adapter_files`` into a LoRA-wrapped model (for resume)."""
    from safetensors.torch import load as load_st

    weights = load_st((directory / ADAPTER_WEIGHTS).read_bytes())
    if hf_names:
        weights = {_rename(k, to_native_name): v for k, v in weights.items()}
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CodexError(f"{directory / ADAPTER_WEIGHTS}: does not fit the model (unexpected {unexpected[:3]})")


def _rename(key: str, fn: Callable[[str], str]) -> str:
    return _PREFIX + fn(key[len(_PREFIX) :]) if key.startswith(_PREFIX) else key
