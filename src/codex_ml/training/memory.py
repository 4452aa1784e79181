"""Per-rank training memory of the native decoder, from its config alone: arithmetic, no allocation.

What a rank holds, by kind (bytes):

- parameters: every weight, in ``model.dtype``; LoRA adapters in fp32 (PEFT upcasts them);
- gradients: one per trainable parameter, in its dtype;
- optimizer: AdamW's two moments per trainable parameter, in its dtype (torch keeps them so; with
  fp32 weights these are the two fp32 moments and the fp32 weights are the master copy: no
  separate one exists, and ``model.dtype=bf16`` trains bf16 weights with bf16 moments);
- activations: what autograd keeps for backward over one micro-batch (``block_activation_bytes``
  per token and block, ``head_activation_bytes`` for the final norm and the fused loss);
- buffers: the copies a strategy adds: DDP's gradient buckets, FSDP's gathered blocks, autocast's
  low-precision weight copies.

``fsdp`` divides parameters, gradients and optimizer state by the world size; ``ddp`` and one
process hold all of it on every rank. The activation formulas are the tensors ``models/gpt.py``
saves, term by term (a test checks them against autograd's own saved tensors); they assume a
memory-efficient attention kernel (flash or efficient SDPA: no T x T scores kept). Left out: the
CUDA context and allocator slack, data-loader buffers, and transient peaks inside one op.
"""

from __future__ import annotations

from dataclasses import dataclass

from codex_ml.models.gpt import GPTConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STRATEGIES = ("none", "ddp", "fsdp")
LOSS_CHUNK = 2048  # tokens whose logits exist at once in the fused loss (models/loss.py's default)
NATIVE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MemorySettings:
    """What decides memory besides the model's shape."""

    strategy: str  # none, ddp, fsdp
    world_size: int
    batch_size: int  # sequences per micro-batch, per rank
    seq_len: int
    weight_dtype: str  # model.dtype
    precision: str  # training.precision: the autocast (compute) dtype
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True  # fsdp only
    compiled: bool = False  # training.compile: logits materialised (the GPU path) instead of the fused loss
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = NATIVE_LINEARS


@dataclass(frozen=True)
class MemoryRow:
    name: str
    bytes: float
    formula: str  # how it was computed, in words a reader can check


@dataclass(frozen=True)
class MemoryPlan:
    rows: list[MemoryRow]
    total_parameters: int
    trainable_parameters: int
    tokens_per_micro_batch: int

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows)

    def row(self, name: str) -> MemoryRow:
        return next(r for r in self.rows if r.name == name)


def block_linear_shapes(c: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Linear in one block."""
    kv = c.n_kv_head * c.head_dim
    return {
        "q_proj": (c.d_model, c.n_head * c.head_dim),
        "k_proj": (c.d_model, kv),
        "v_proj": (c.d_model, kv),
        "o_proj": (c.n_head * c.head_dim, c.d_model),
        "gate_proj": (c.d_model, c.d_ff),
        "up_proj": (c.d_model, c.d_ff),
        "down_proj": (c.d_ff, c.d_model),
    }


def block_parameters(c: GPTConfig) -> int:
    """One block: seven projections and two RMSNorm weights."""
    return sum(i * o for i, o in block_linear_shapes(c).values()) + 2 * c.d_model


def root_parameters(c: GPTConfig) -> int:
    """Outside the blocks: the embedding, the final norm, and the output head unless tied."""
    return c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.d_model


def count_parameters(c: GPTConfig) -> int:
    """Every parameter of ``GPT(c)``, a tied matrix once (as ``sum(p.numel() for p in model.parameters())``)."""
    return c.n_layer * block_parameters(c) + root_parameters(c)


def lora_parameters(c: GPTConfig, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA's A (r x in) and B (out x r) for each adapted Linear; ``lm_head`` may be a target too."""
    shapes = block_linear_shapes(c)
    unknown = [t for t in targets if t not in shapes and t != "lm_head"]
    if unknown:
        known = ", ".join([*shapes, "lm_head"])
        raise ValueError(f"no Linear named {', '.join(unknown)} in the native decoder; its Linears: {known}")
    per_block = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    head = rank * (c.d_model + c.vocab_size) if "lm_head" in targets else 0
    return c.n_layer * per_block + head


def block_activation_bytes(c: GPTConfig, residual: int, compute: int) -> float:
    """Bytes autograd keeps per token for one block, as ``Block.forward`` computes it.

    residual: bytes of the residual stream and norm weights; compute: of the matmuls (autocast's
    dtype, or the residual's when there is no autocast). Under autocast each Linear casts its
    input for itself, so a norm's output is kept once per consumer (3 in attention, 2 in the MLP).
    """
    d, kv, f = c.d_model, c.n_kv_head * c.head_dim, c.d_ff
    mixed = compute != residual

    def norm(consumers: int) -> float:
        # rstd (fp32), x.float() (x itself when fp32), the normalised x (kept by weight * x), the output its Linears keep
        return 4 + 4 * d + residual * d + (consumers * compute * d if mixed else residual * d)

    attention = compute * (2 * d + 2 * kv) + 4 * c.n_head  # q and k after RoPE, v, the output; fp32 logsumexp per head
    mlp = 4 * compute * f  # gate, up, silu(gate), silu(gate) * up
    return norm(3) + attention + norm(2) + mlp


def head_activation_bytes(c: GPTConfig, residual: int, compute: int, compiled: bool) -> float:
    """Bytes per token outside the blocks: the final norm, the loss's saved tensors, the token ids.

    The fused loss (eager) keeps the gradient of the hidden states (computed in forward); compiled,
    the logits exist for every token (fp32 log-probabilities kept for backward).
    """
    d = c.d_model
    final_norm = 4 + 4 * d + residual * d
    loss = 4 * c.vocab_size if compiled else residual * d
    return final_norm + loss + 8  # the int64 token ids, for the embedding's backward


def activation_bytes(c: GPTConfig, tokens: int, residual: int, compute: int, checkpointing: bool, compiled: bool) -> float:
    """Peak activation memory of one micro-batch of ``tokens`` tokens.

    Without checkpointing every block's tensors live until backward. With it each block keeps only
    its input, and backward recomputes one block at a time, whose tensors are the peak's extra.
    Eager, the fused loss also keeps the output weight's gradient (vocab x d_model, fp32) per micro-batch.
    """
    block = block_activation_bytes(c, residual, compute)
    per_token = head_activation_bytes(c, residual, compute, compiled)
    if checkpointing:
        per_token += c.n_layer * residual * c.d_model + block
    else:
        per_token += c.n_layer * block
    weight_grad = 0 if compiled else 4 * c.vocab_size * c.d_model
    return tokens * per_token + weight_grad


def plan_memory(c: GPTConfig, s: MemorySettings) -> MemoryPlan:
    """The per-rank memory of training ``c`` under ``s``, by kind (see the module's docstring)."""
    if s.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {s.strategy!r}")
    if s.world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {s.world_size}")
    w = DTYPE_BYTES[s.weight_dtype]
    low = DTYPE_BYTES[s.precision] if s.precision != "fp32" else w  # matmuls' dtype
    shard = s.world_size if s.strategy == "fsdp" else 1
    n_base = count_parameters(c)
    n_lora = lora_parameters(c, s.lora_rank, s.lora_targets) if s.lora_rank else 0
    trainable, grad_bytes = (n_lora, 4) if s.lora_rank else (n_base, w)
    where = f" / {shard} ranks" if shard > 1 else ""
    rows = [
        MemoryRow(
            "parameters",
            (n_base * w + n_lora * 4) / shard,
            f"{n_base:,} x {w} bytes ({s.weight_dtype})" + (f" + {n_lora:,} LoRA x 4 bytes" if n_lora else "") + where,
        ),
        MemoryRow("gradients", trainable * grad_bytes / shard, f"{trainable:,} trainable x {grad_bytes} bytes{where}"),
        MemoryRow(
            "optimizer", 2 * trainable * grad_bytes / shard, f"AdamW: 2 moments x {trainable:,} x {grad_bytes} bytes{where}"
        ),
    ]
    # FSDP computes with its mixed-precision policy's parameters (training.precision): the residual
    # stream and norms follow them. Elsewhere the weights stay in model.dtype and autocast casts.
    residual = low if s.strategy == "fsdp" else w
    tokens = s.batch_size * s.seq_len
    act = activation_bytes(c, tokens, residual, low, s.activation_checkpointing, s.compiled)
    ckpt = "checkpointed blocks" if s.activation_checkpointing else f"{c.n_layer} blocks"
    rows.append(MemoryRow("activations", act, f"{s.batch_size} x {s.seq_len} tokens, {ckpt}, {s.precision} compute"))
    rows.append(_buffers(c, s, n_base + n_lora, trainable * grad_bytes, w, low))
    return MemoryPlan(rows, n_base + n_lora, trainable, tokens)


def _buffers(c: GPTConfig, s: MemorySettings, n_params: int, grad_total: float, w: int, low: int) -> MemoryRow:
    matmul_weights = c.n_layer * (block_parameters(c) - 2 * c.d_model)
    if s.strategy == "fsdp":
        if s.reshard_after_forward:
            # the block computing and the next one prefetched, gathered, plus the root's parameters
            # (the embedding and head stay gathered for the whole step); one block's unsharded fp32 gradients
            gathered = (2 * block_parameters(c) + root_parameters(c)) * low
            how = f"2 gathered blocks + root in {low} bytes, one block's fp32 gradients for reduce-scatter"
        else:
            gathered = n_params * low
            how = f"every parameter gathered in {low} bytes (reshard_after_forward=false), one block's fp32 gradients"
        return MemoryRow("buffers", gathered + block_parameters(c) * 4, how)
    total, parts = 0.0, []
    if s.strategy == "ddp" and s.world_size > 1:
        total += grad_total  # DDP's reducer buckets copy every gradient (gradient_as_bucket_view=False)
        parts.append("DDP gradient buckets")
    if low != w:
        # autocast's casts of the blocks' weights, kept for backward: of every block, or with
        # checkpointing of the one block being recomputed
        total += matmul_weights * low / (c.n_layer if s.activation_checkpointing else 1)
        parts.append(f"autocast weight copies ({s.precision})")
    return MemoryRow("buffers", total, ", ".join(parts) or "none")
