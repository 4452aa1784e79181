"""Recipe piece: build the model a config asks for, with what the loop and checkpoints need of it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from codex_ml.conf.schema import TrainConfig
from codex_ml.models.fused_loss import linear_cross_entropy
from codex_ml.models.gpt import CONFIG_NAME, GPT, WEIGHTS_NAME, GPTConfig
from codex_ml.training.checkpoint import CheckpointError


def padded_vocab(tokenizer_size: int, multiple: int = 64) -> int:
    """Round the embedding table up to a multiple of 64: faster matmuls, and room the tokenizer never uses."""
    return (tokenizer_size + multiple - 1) // multiple * multiple


@dataclass
class ModelBundle:
    module: torch.nn.Module
    describe: str
    max_seq_len: int
    forward_with: Callable[[torch.nn.Module], Callable[[dict], torch.Tensor]]  # batch -> logits
    loss_sum_with: Callable[[torch.nn.Module], Callable[[dict], torch.Tensor]]  # batch -> summed token loss
    checkpoint_files: Callable[[], dict[str, bytes]]
    load_checkpoint: Callable[[Path], None]
    flops_per_token: Callable[[int], float]
    can_generate: bool = True

    def parameter_counts(self) -> dict:
        params = list(self.module.parameters())
        return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def native_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    m = cfg.model
    return GPTConfig(
        vocab_size=m.vocab_size or padded_vocab(vocab_size), n_layer=m.n_layer, n_head=m.n_head,
        n_kv_head=m.n_kv_head, d_model=m.d_model, d_ff=m.d_ff, max_seq_len=m.max_seq_len,
        rope_theta=m.rope_theta, norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings,
        dropout=m.dropout, init_std=m.init_std,
    )


def _native_forward(module: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    def forward(batch: dict) -> torch.Tensor:
        return module(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=batch.get("attn_mask"))
    return forward


def _native_loss_sum(module: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    """The loss fused with the output projection: no full logits tensor (see models/fused_loss.py)."""
    head = _unwrapped(module).lm_head

    def loss_sum(batch: dict) -> torch.Tensor:
        hidden = module(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=batch.get("attn_mask"),
                        return_hidden=True)
        return linear_cross_entropy(hidden, head.weight, batch["labels"])
    return loss_sum


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile and DDP wrappers."""
    while hasattr(module, "_orig_mod") or hasattr(module, "module"):
        module = getattr(module, "_orig_mod", None) or module.module
    return module


def native_weight_files(model: GPT) -> dict[str, bytes]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {
        WEIGHTS_NAME: save_safetensors(state, metadata={"format": "pt"}),
        CONFIG_NAME: (json.dumps(model.config.to_dict(), indent=2) + "\n").encode(),
    }


def load_native_weights(model: GPT, directory: Path) -> None:
    path = directory / WEIGHTS_NAME
    try:
        state = load_safetensors(path.read_bytes())
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def build_native(cfg: TrainConfig, vocab_size: int, device: torch.device) -> ModelBundle:
    config = native_config(cfg, vocab_size)
    if config.vocab_size < vocab_size:
        from codex_ml.conf.schema import ConfigError

        raise ConfigError("model.vocab_size", f"{config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens")
    model = GPT(config).to(device)
    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing = True
    return ModelBundle(
        module=model,
        describe=f"native {cfg.model.preset} ({config.n_layer} layers, width {config.d_model}, "
                 f"{config.n_head} heads / {config.n_kv_head} kv, vocab {config.vocab_size})",
        max_seq_len=config.max_seq_len,
        forward_with=_native_forward,
        loss_sum_with=_native_loss_sum,
        checkpoint_files=lambda: native_weight_files(model),
        load_checkpoint=lambda d: load_native_weights(model, d),
        flops_per_token=model.flops_per_token,
    )


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, tokenizer_dir: Path, log) -> ModelBundle:
    if cfg.model.kind == "native":
        return build_native(cfg, vocab_size, device)
    raise NotImplementedError(f"model.kind={cfg.model.kind} is not supported yet")
