"""Any local Hugging Face causal LM under the scheduler: the model's own layers, our slot cache.

The scheduler decodes every running sequence in one forward pass, each row writing its keys and values
at its own position of a ``SlotKVCache`` and attending under the scheduler's mask. Llama-family models
convert to the native decoder (faster: fused projections, compiled steps). Every other architecture
(GPT-2, Qwen2, Mistral, ...) runs through ``HFSlotDecoder``: its embeddings, norms, rotary or learned
positions and MLPs are the model's own, and its attention goes through transformers' attention
interface to a function that does what the native decoder does with the slot cache.

A model whose layers bypass that interface, or whose attention does more than this function (attention sinks:
refused when it asks for them), would decode wrong tokens silently; ``check_matches_model`` compares the
wrapper's logits with the model's own forward pass on a probe prompt at start-up and refuses the model
when they differ.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from codex_ml.errors import CodexError
from codex_ml.models.hf import context_length

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from codex_ml.models.gpt import KVCache

PROBE_TOLERANCE = 1e-4  # relative to the largest logit: in fp32 both paths agree to rounding (measured: exactly, on CPU)
_names = itertools.count()
# attention arguments that change the result and that the slot attention does not implement: such a model is
# refused rather than served wrong (a sliding window never matters: the context is clipped to it)
_UNSUPPORTED_ATTENTION_ARGS = ("s_aux", "sinks")


class UnsupportedModel(CodexError):
    """A Hugging Face model the scheduler cannot decode exactly."""


@dataclass(frozen=True)
class DecoderDims:
    """What the slot cache and the scheduler read from a decoder's config."""

    vocab_size: int
    n_layer: int
    n_kv_head: int
    head_dim: int
    max_seq_len: int


class _Pass:
    """The cache and mask of the forward pass under way (one scheduler thread owns the model)."""

    cache: KVCache | None = None
    mask: torch.Tensor | None = None


def _dims(model: PreTrainedModel) -> DecoderDims:
    c = model.config.get_text_config()
    n_head = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    context = context_length(c)
    window = getattr(c, "sliding_window", None)
    if isinstance(window, int) and window > 0:
        context = min(context, window)  # within the window, sliding-window attention is full attention
    return DecoderDims(
        vocab_size=c.vocab_size,
        n_layer=c.num_hidden_layers,
        n_kv_head=getattr(c, "num_key_value_heads", None) or n_head,
        head_dim=head_dim,
        max_seq_len=context,
    )


class HFSlotDecoder(nn.Module):
    """A Hugging Face causal LM with the native decoder's call: ``(input_ids, position_ids, attn_mask,
    kv_cache, return_hidden)``, where ``kv_cache`` is a bound ``SlotKVCache`` and ``attn_mask`` a boolean
    (B, 1, T, span) mask, True where a query may see a key."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        self.hf = model.eval()
        # what the model ran with before (kept across a second wrapping, for the start-up check's reference)
        self.original_attention = getattr(model, "_codex_ml_original_attention", model.config._attn_implementation)
        model._codex_ml_original_attention = self.original_attention
        self.config = _dims(model)
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise UnsupportedModel(f"{type(model).__name__}: no linear output projection to serve")
        self.lm_head = head  # where the scheduler finds the device and dtype
        self._pass = _Pass()
        state = self._pass

        def slot_attention(
            module: nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            scaling: float | None = None,
            dropout: float = 0.0,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, None]:
            # query (B, heads, T, head_dim); key, value (B, kv_heads, T, head_dim), rotary already applied
            assert state.cache is not None  # set by forward
            unsupported = sorted(k for k in _UNSUPPORTED_ATTENTION_ARGS if kwargs.get(k) is not None)
            if unsupported:
                raise UnsupportedModel(f"attention with {', '.join(unsupported)} is not reproduced by the serving cache")
            layer: int = module.layer_idx  # type: ignore[assignment]  # every HF attention module numbers its layer
            keys, values = state.cache.append(layer, key, value)
            softcap = kwargs.get("softcap")
            if softcap is None:
                out = F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=state.mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[1]
                )
            else:  # Gemma 2: scores soft-capped before the softmax, which SDPA cannot do
                out = _softcapped_attention(query, keys, values, state.mask, scaling, softcap)
            return out.transpose(1, 2).contiguous(), None

        # one name per decoder: the function reads this decoder's pass. The model's own mask is not needed.
        self.attention_name = f"codex_ml_slots_{next(_names)}"
        AttentionInterface.register(self.attention_name, slot_attention)
        AttentionMaskInterface.register(self.attention_name, lambda *args, **kwargs: None)
        model.set_attn_implementation(self.attention_name)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor,
        kv_cache: KVCache,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or of the last ``logits_to_keep`` positions only. The model's whole forward
        runs, so what it does after its output projection (soft-capping, scaling) is kept."""
        self._pass.cache, self._pass.mask = kv_cache, attn_mask
        try:
            return self.hf(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=logits_to_keep).logits
        finally:
            self._pass.cache = self._pass.mask = None

    def fuse_for_inference(self) -> HFSlotDecoder:
        return self  # the model's own modules run as they are


def _softcapped_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float,
) -> torch.Tensor:
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = query @ keys.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), -1).to(values.dtype) @ values


def check_matches_model(decoder: HFSlotDecoder, original_forward: Any, probe_ids: list[int]) -> None:
    """Refuse a model whose wrapped forward is not its own: the last position's logits on ``probe_ids``
    through a one-slot cache against ``original_forward`` (the model's forward with its usual attention)."""
    from codex_ml.models.gpt import SlotKVCache

    p = decoder.lm_head.weight
    n = len(probe_ids)
    ids = torch.tensor([probe_ids], dtype=torch.long, device=p.device)
    positions = torch.arange(n, device=p.device)[None]
    cache = SlotKVCache(decoder.config, 1, n, p.device, p.dtype)
    cache.bind(slice(0, 1), positions, n)
    mask = (positions[0, None, :] <= positions[0, :, None])[None, None]
    with torch.inference_mode():
        ours = decoder(ids, positions, mask, cache)[0].float()
        theirs = original_forward(ids).float()
    gap = (ours - theirs).abs().max().item()
    if not gap <= PROBE_TOLERANCE * max(1.0, theirs.abs().max().item()):
        raise UnsupportedModel(
            f"{decoder.hf.config.model_type}: its layers do not decode through the serving cache "
            f"(logits differ from the model's own by {gap:.2g} on a probe prompt); not served"
        )


def wrap_hf_model(model: PreTrainedModel, probe_ids: list[int]) -> HFSlotDecoder:
    """``model`` under the scheduler, once its wrapped forward is shown to equal its own."""
    decoder = HFSlotDecoder(model)

    def original(ids: torch.Tensor) -> torch.Tensor:
        model.set_attn_implementation(decoder.original_attention)
        try:
            return model(input_ids=ids, use_cache=False).logits[0]
        finally:
            model.set_attn_implementation(decoder.attention_name)

    check_matches_model(decoder, original, probe_ids)
    return decoder
