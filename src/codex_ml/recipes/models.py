"""Recipe piece: build the model a config asks for, with what the loop and checkpoints need of it.

Three kinds of model reach the loop: the native decoder (from scratch, or continuing a native
run); a Llama-family Hugging Face directory converted exactly into the native decoder (native
speed; ``model.native_conversion``); and any other local causal LM as the Hugging Face module
itself. Each may be wrapped with LoRA. The bundle hides the differences from the loop.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from codex_ml.conf.schema import ConfigError, TrainConfig
from codex_ml.models.gpt import CONFIG_NAME, GPT, WEIGHTS_NAME, GPTConfig, document_block_mask
from codex_ml.models.hf import context_length
from codex_ml.models.loss import linear_cross_entropy, summed_token_loss
from codex_ml.training.checkpoint import (
    BASE_WEIGHTS,
    HF_CONFIG,
    SOURCE_FILE,
    find_native_weights,
    hf_weight_files,
    load_hf_weights,
    load_native_weights,
    native_weight_files,
)
from codex_ml.training.device import DTYPES

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask
    from transformers import PreTrainedModel

# HF architectures whose logits are exactly lm_head(backbone(x)): the fused loss applies
_FUSABLE = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "starcoder2", "gpt_bigcode", "phi3"}


def padded_vocab(tokenizer_size: int, multiple: int = 64) -> int:
    """Round the embedding table up to a multiple of 64: faster matmuls, and room the tokenizer never uses."""
    return (tokenizer_size + multiple - 1) // multiple * multiple


@dataclass
class ModelBundle:
    module: torch.nn.Module  # what trains (LoRA-wrapped when asked)
    describe: str
    max_seq_len: int
    forward_with: Callable[[torch.nn.Module], Callable[[dict], torch.Tensor]]  # batch -> logits
    loss_sum_with: Callable[[torch.nn.Module], Callable[[dict], torch.Tensor]]  # batch -> summed token loss
    checkpoint_files: Callable[[], dict[str, bytes]]
    load_checkpoint: Callable[[Path], None]
    flops_per_token: Callable[[int], float]
    native: GPT | None = None  # the native decoder inside, when there is one (generation, export)
    source: dict = field(default_factory=dict)
    supports_packing: bool = True
    config_files: Callable[[], dict[str, bytes]] = dict  # the checkpoint's files besides the weights
    on_meta: bool = False  # parameters not yet allocated (made for sharding: training/fsdp.py)

    @property
    def can_generate(self) -> bool:
        return self.native is not None

    def parameter_counts(self) -> dict:
        params = list(self.module.parameters())
        return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def native_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    m = cfg.model
    return GPTConfig(
        vocab_size=m.vocab_size or padded_vocab(vocab_size),
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_kv_head=m.n_kv_head,
        d_model=m.d_model,
        d_ff=m.d_ff,
        max_seq_len=m.max_seq_len,
        rope_theta=m.rope_theta,
        norm_eps=m.norm_eps,
        tie_embeddings=m.tie_embeddings,
        dropout=m.dropout,
        init_std=m.init_std,
    )


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile, DDP and PEFT wrappers."""
    while True:
        # nn.Module's __getattr__ is typed Tensor | Module: these wrappers hold Modules
        if hasattr(module, "_orig_mod"):
            module = cast(torch.nn.Module, module._orig_mod)
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "get_base_model"):
            module = cast(torch.nn.Module, module.get_base_model())  # type: ignore[operator]
        else:
            return module


# ------------------------------------------------------------------ forward and loss


def _attention_mask(batch: dict) -> torch.Tensor | BlockMask | None:
    """The batch's dense mask, or a FlexAttention mask built on the batch's device from example ids."""
    if "segments" in batch:
        return document_block_mask(batch["segments"])
    return batch.get("attn_mask")


def native_forward(module: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    def forward(batch: dict) -> torch.Tensor:
        return module(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=_attention_mask(batch))

    return forward


def native_loss_sum(module: torch.nn.Module, fused: bool = True) -> Callable[[dict], torch.Tensor]:
    """The loss fused with the output projection: no full logits tensor (see models/loss.py).

    ``fused=False`` computes logits and the loss inside ``module`` (what torch.compile fuses best on GPU).
    """
    head = unwrapped(module).lm_head
    if not fused or type(head) is not torch.nn.Linear:  # LoRA on the output layer: its weight is not the projection
        forward = native_forward(module)
        return lambda batch: summed_token_loss(forward(batch), batch["labels"])

    def loss_sum(batch: dict) -> torch.Tensor:
        hidden = module(
            batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=_attention_mask(batch), return_hidden=True
        )
        return linear_cross_entropy(hidden, head.weight, batch["labels"])

    return loss_sum


def _hf_kwargs(batch: dict) -> dict:
    kw = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        kw["attention_mask"] = batch["attention_mask"]
    return kw


def hf_forward(module: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    def forward(batch: dict) -> torch.Tensor:
        return module(**_hf_kwargs(batch), use_cache=False).logits

    return forward


def hf_loss_sum(module: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    """The summed token loss of a Hugging Face causal LM; fused with the output projection where exact.

    The backbone is called directly (its hidden states, not the logits), so ``module`` must be the
    model itself or its PEFT/compile wrapper, never a DDP wrapper: data parallelism wraps the loss
    (``models.loss.SummedLossModule``) so that this whole function runs inside ``DDP.forward``.
    """
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            "hf_loss_sum: pass the model, and wrap SummedLossModule(model, loss) in DDP instead, "
            "or the backbone call bypasses DDP.forward and gradients are never synchronised"
        )
    inner = cast("PreTrainedModel", unwrapped(module))  # a Hugging Face module here
    if getattr(inner.config, "model_type", None) not in _FUSABLE:
        forward = hf_forward(module)
        return lambda batch: summed_token_loss(forward(batch), batch["labels"])
    backbone, head = inner.base_model, inner.get_output_embeddings()
    assert head is not None  # every model type in _FUSABLE has an output projection

    def loss_sum(batch: dict) -> torch.Tensor:
        hidden = backbone(**_hf_kwargs(batch), use_cache=False).last_hidden_state
        return linear_cross_entropy(hidden, head.weight, batch["labels"])

    return loss_sum


# ------------------------------------------------------------------ building


def _base_model(
    cfg: TrainConfig, vocab_size: int, dtype: torch.dtype, log: Callable[[str], None], on_meta: bool = False
) -> tuple[torch.nn.Module, GPT | None, dict]:
    """(the module, the native decoder when there is one, a description of where it came from)."""
    m = cfg.model
    if m.kind == "native":
        if m.path:
            src = find_native_weights(Path(m.path).expanduser())
            native_cfg = GPTConfig.from_dict(json.loads((src / CONFIG_NAME).read_text()))
            model = GPT(native_cfg)
            load_native_weights(model, src)
            log(f"model: continuing the native model in {src}")
            return model.to(dtype), model, {"kind": "native", "path": str(src)}
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = GPT(native_config(cfg, vocab_size)).to(dtype)
        return model, model, {"kind": "native", "path": None}
    from codex_ml.models.convert import ConversionError, gpt_config_from_llama, hf_to_native
    from codex_ml.models.hf import check_model_dir, hf_config, load_hf_causal_lm

    assert m.path is not None  # validate_model: model.kind=hf needs model.path
    path = Path(m.path).expanduser().resolve()
    check_model_dir(path)
    config = hf_config(path, m.trust_remote_code)
    if m.native_conversion and cfg.training.engine == "native":
        try:
            gpt_config_from_llama(config)
            convertible = True
        except ConversionError as why:
            convertible = False
            log(f"model: {config.model_type} trains as the Hugging Face module ({why})")
        if convertible:
            hf = load_hf_causal_lm(path, torch.float32, torch.device("cpu"), m.trust_remote_code)
            model = hf_to_native(hf).to(dtype)
            del hf
            log(f"model: {path} ({config.model_type}) loaded into the native decoder, exactly")
            return model, model, {"kind": "hf-native", "path": str(path), "model_type": config.model_type}
    hf_model = load_hf_causal_lm(path, dtype, torch.device("cpu"), m.trust_remote_code)
    hf_model.config.use_cache = False
    return hf_model, None, {"kind": "hf", "path": str(path), "model_type": config.model_type}


def build_model(
    cfg: TrainConfig, vocab_size: int, device: torch.device, log: Callable[[str], None], on_meta: bool = False
) -> ModelBundle:
    """The model ``cfg`` asks for on ``device``. ``on_meta``: a native model from scratch without LoRA
    is made on the meta device, parameters unallocated, to be sharded and then materialised
    (``training/fsdp.py``); ``bundle.on_meta`` says whether it was."""
    m, lo = cfg.model, cfg.lora
    dtype = DTYPES[m.dtype]
    on_meta = on_meta and m.kind == "native" and not m.path and not lo.enabled
    base, native, source = _base_model(cfg, vocab_size, dtype, log, on_meta)
    hf_module = native is None
    hf_base = cast("PreTrainedModel", base)  # what base is when there is no native decoder
    if native is None:
        emb = hf_base.get_input_embeddings().weight.shape[0]  # type: ignore[index]  # nn.Module attributes are typed Tensor | Module
        if emb < vocab_size:
            raise ConfigError("model.path", f"the model's {emb} embeddings are fewer than its tokenizer's {vocab_size} tokens")
    elif native.config.vocab_size < vocab_size:
        raise ConfigError("model.vocab_size", f"{native.config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens")
    if m.activation_checkpointing:
        if native is None:
            hf_base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            native.gradient_checkpointing = True
    module = base
    hf_names = source["kind"] in ("hf", "hf-native")
    if lo.enabled:
        from codex_ml.models.lora import adapter_files, apply_lora, load_adapter, resolve_target_modules

        frozen = {}
        if source["kind"] == "native" and not source.get("path"):
            # a base made from scratch exists nowhere else: keep it next to the adapter
            assert native is not None  # kind "native"
            weights = native_weight_files(native)
            frozen = {BASE_WEIGHTS: weights[WEIGHTS_NAME], CONFIG_NAME: weights[CONFIG_NAME]}
        targets = resolve_target_modules(base, list(lo.target_modules), source.get("model_type"))
        log(f"lora: adapting {targets.describe()}")
        module = apply_lora(base, lo.r, lo.alpha, lo.dropout, targets.names, causal_lm=hf_module)
        files = lambda: {**adapter_files(module, hf_names=source["kind"] == "hf-native", base_path=source.get("path")), **frozen}
        load = lambda d: load_adapter(module, d, hf_names=source["kind"] == "hf-native")
    elif native is None:
        files, load = (lambda: hf_weight_files(hf_base)), (lambda d: load_hf_weights(base, d))
    else:
        files, load = (lambda: native_weight_files(native)), (lambda d: load_native_weights(native, d))
    if not on_meta:
        module = module.to(device)

    def config_files() -> dict[str, bytes]:
        """What a checkpoint says of its model besides the weights (under fsdp the weights are DCP shards)."""
        config = (
            (hf_base.config.to_json_string() + "\n").encode()
            if native is None
            else (json.dumps(native.config.to_dict(), indent=2) + "\n").encode()
        )
        source_record = {**source, "lora": lo.enabled, "adapter_hf_names": hf_names and lo.enabled}
        source_json = (json.dumps(source_record, indent=2) + "\n").encode()
        return {HF_CONFIG if native is None else CONFIG_NAME: config, SOURCE_FILE: source_json}

    def checkpoint_files() -> dict[str, bytes]:
        out = files()
        out.update(config_files())
        return out

    if native is None:
        config = hf_base.config
        max_len = context_length(config)
        n = sum(p.numel() for p in base.parameters()) - hf_base.get_input_embeddings().weight.numel()  # type: ignore[operator]  # as above
        describe = f"{config.model_type} from {source['path']} (Hugging Face module)"
        return ModelBundle(
            module,
            describe,
            int(max_len),
            hf_forward,
            hf_loss_sum,
            checkpoint_files,
            load,
            lambda seq: 6.0 * n,
            native=None,
            source=source,
            supports_packing=False,
            config_files=config_files,
        )
    c = native.config
    origin = f"from {source['path']}" if source.get("path") else m.preset
    describe = (
        f"native {origin} ({c.n_layer} layers, width {c.d_model}, {c.n_head} heads / {c.n_kv_head} kv, "
        f"vocab {c.vocab_size}, {m.dtype})"
    )
    return ModelBundle(
        module,
        describe,
        c.max_seq_len,
        native_forward,
        native_loss_sum,
        checkpoint_files,
        load,
        native.flops_per_token,
        native=native,
        source=source,
        config_files=config_files,
        on_meta=on_meta,
    )
