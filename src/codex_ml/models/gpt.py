"""The native decoder: a Llama-style transformer (RoPE, RMSNorm, SwiGLU, grouped-query attention).

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` one to one (without its
``model.`` prefix), so export and import are renames, not reshapes (see ``convert.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


class CacheShape(Protocol):
    """What a KV cache needs to know of a decoder: ``GPTConfig``, or a wrapped Hugging Face model's dims."""

    @property
    def n_layer(self) -> int: ...
    @property
    def n_kv_head(self) -> int: ...
    @property
    def head_dim(self) -> int: ...


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    d_model: int = 256
    d_ff: int = 688
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("the head size d_model/n_head must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale after casting back, as Llama does, so bf16 runs match it too.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim), in the half-rotation layout HF Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) or (B, 1, T, D)."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions.

    ``length`` is how many positions are filled; decoding appends one position per step.
    Rows of a batch share the same positions (prompts are left-padded by the caller).
    """

    def __init__(
        self, config: CacheShape, batch_size: int, max_len: int, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (e.g. after some sequences finished)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


class StaticKVCache(KVCache):
    """A cache whose shapes never change, for ``torch.compile`` and CUDA graphs.

    Writes go to the positions in the tensor ``slot`` (moved on by ``advance`` on the device, no
    host round trip) and attention always spans all ``max_len`` positions: the caller's mask hides
    the ones not written yet. Callers pass ``position_ids``.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__(config, batch_size, max_len, device, dtype)
        self.slot = torch.zeros((), dtype=torch.long, device=device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.slot + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, index, k)
        self.v[layer].index_copy_(2, index, v)
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        self.slot.add_(n)


class SlotKVCache(KVCache):
    """Independent sequences in the rows ("slots") of one cache, for continuous batching.

    Each slot holds one sequence from its position 0, so sequences start and end at any step.
    ``bind(rows, positions, span)`` says which slots the next forward call covers (a slice of the slot
    axis, so the cache is viewed, not copied), where each of their tokens goes, and how many of the
    first positions attention spans (default all ``max_len``); the caller's mask, ``span`` keys wide,
    hides what a row may not see. Positions past every row's own are masked anyway: leaving them out
    of the view only saves reading them. Callers pass ``position_ids`` and a mask; ``length`` stays 0.
    """

    def __init__(
        self, config: CacheShape, n_slots: int, max_len: int, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        super().__init__(config, n_slots, max_len, device, dtype)
        self.rows = slice(0, n_slots)
        self.positions: torch.Tensor | None = None
        self.span = max_len

    def bind(self, rows: slice, positions: torch.Tensor, span: int | None = None) -> None:
        """The slots ``rows`` run next; ``positions`` (n_rows, T): the cache position of each token, all
        below ``span`` (default ``max_len``), the number of first positions attention reads."""
        self.rows, self.positions = rows, positions
        self.span = self.max_len if span is None else span

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.k[layer][self.rows], self.v[layer][self.rows]
        row = torch.arange(keys.shape[0], device=k.device)[:, None]
        keys[row, :, self.positions] = k.transpose(1, 2)  # (rows, T, heads, head_dim) at each row's positions
        values[row, :, self.positions] = v.transpose(1, 2)
        return keys[:, :, : self.span], values[:, :, : self.span]

    def advance(self, n: int) -> None:
        pass  # positions are the caller's, per row (bind)


def document_block_mask(segments: torch.Tensor) -> BlockMask:
    """A FlexAttention mask for packed rows: causal within each example (``segments`` ids, -1 padding).

    Padding positions attend to themselves only, so no row of attention is empty.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = segments.shape

    def keep(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return ((segments[b, q] == segments[b, k]) & (segments[b, k] >= 0) & (k <= q)) | (q == k)

    return create_block_mask(keep, B, None, T, T, device=segments.device)


def _require_mask_for_cache(kv_cache: KVCache, shape: tuple[int, int], start: int) -> None:
    """Without a mask, attention is causal only when queries and keys line up (an empty growing cache) or
    when there is one query (it may see every key). Anything else would silently attend non-causally."""
    T = shape[1]
    if type(kv_cache) is not KVCache:  # static and slot caches: attention spans every position, written or not
        raise ValueError(
            f"input of shape {shape} on a {type(kv_cache).__name__} of {kv_cache.max_len} positions "
            f"needs attn_mask (B, 1, {T}, {kv_cache.max_len}) hiding the positions a row may not see"
        )
    if start > 0 and T > 1:
        raise ValueError(
            f"input of shape {shape} on a KV cache already holding {start} positions needs attn_mask "
            f"(B, 1, {T}, {start + T}): without one, {T} queries over {start + T} keys are not causal"
        )


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout
        self.fused_qkv: torch.Tensor | None = None  # set by GPT.fuse_for_inference: one matmul instead of three

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | BlockMask | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused_qkv is not None and not self.training:
            q, k, v = F.linear(x, self.fused_qkv).split(
                [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
            # a FlexAttention BlockMask (packed rows): block-sparse, masked blocks are skipped
            from torch.nn.attention.flex_attention import flex_attention

            y = flex_attention(q, k, v, block_mask=attn_mask, enable_gqa=self.n_kv_head != self.n_head)
        else:
            # Causal masking without a mask tensor only works when queries and keys line up.
            is_causal = attn_mask is None and k.shape[2] == T
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.fused_gate_up: torch.Tensor | None = None  # set by GPT.fuse_for_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None and not self.training:
            gate, up = F.linear(x, self.fused_gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | BlockMask | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    # buffers made by register_buffer, declared for the type checker (nn.Module's __getattr__ says Tensor | Module)
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~30% more compute
        self.reset_parameters()

    def reset_buffers(self) -> None:
        """Recompute the rotary tables in place (a model made on the meta device has none yet)."""
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # GPT-2's scaling: residual projections shrink with depth so the stream's variance stays put.
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                nn.init.ones_(p)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | BlockMask | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits of shape (B, T, vocab); with ``return_hidden``, the final normalised hidden states
        (B, T, d_model) instead, for a loss fused with the output projection (``fused_loss.py``).

        position_ids: (B, T) positions, when rows restart (packed examples) or are left-padded;
        attn_mask: boolean (B, 1, T, S), True where a query may attend to a key, or a FlexAttention
            BlockMask (``document_block_mask``) for packed rows;
        kv_cache: appends this call's keys and values; positions continue from ``kv_cache.length``.
        """
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if attn_mask is None and kv_cache is not None:
            _require_mask_for_cache(kv_cache, (B, T), start)
        if position_ids is None:
            if start + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        else:
            cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        x = self.embed_tokens(input_ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def fuse_for_inference(self) -> GPT:
        """Concatenate the q/k/v and gate/up weights so decoding runs one matmul for each group: the
        per-call overhead dominates when there is one token per row. Used in eval mode only, and
        dropped by ``train()``, so training never sees stale copies."""
        with torch.no_grad():
            for block in self._blocks():
                a, m = block.self_attn, block.mlp
                a.fused_qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
                m.fused_gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()
        return self.eval()

    def _blocks(self) -> list[Block]:
        # nn.ModuleList yields plain Modules to the type checker; every entry is a Block (__init__)
        return cast("list[Block]", list(self.layers))

    def unfuse(self) -> GPT:
        """Drop the copies made by ``fuse_for_inference``, so later weight updates cannot go unseen."""
        for block in self._blocks():
            block.self_attn.fused_qkv = block.mlp.fused_gate_up = None
        return self

    def train(self, mode: bool = True) -> GPT:
        if mode:
            self.unfuse()
        return super().train(mode)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, static: bool = False) -> KVCache:
        p = self.lm_head.weight
        kind = StaticKVCache if static else KVCache
        return kind(self.config, batch_size, max_len or self.config.max_seq_len, p.device, p.dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; ``non_embedding`` leaves out the input embedding table, which is a lookup, not a
        matmul (unless tied, when the same matrix is the output projection and counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the weights plus 12·L·H·Q·T for attention (PaLM's count)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model_config.json"
