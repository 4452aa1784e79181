"""Recipe: `codex-ml plan`, the per-rank memory of a training config before booking machines.

Everything comes from the config (and, for ``model=hf``, the model directory's config.json):
nothing is allocated, so planning the ``large`` preset on 64 ranks runs on a laptop.
"""

from __future__ import annotations

from pathlib import Path

from codex_ml.conf.schema import ConfigError, PlanConfig
from codex_ml.models.gpt import GPTConfig
from codex_ml.training.memory import NATIVE_LINEARS, MemoryPlan, MemorySettings, plan_memory


def plan_command(cfg: PlanConfig) -> MemoryPlan:
    """Print the memory table of ``cfg`` and return it."""
    model, describe = model_shape(cfg)
    settings = memory_settings(cfg, model)
    try:
        plan = plan_memory(model, settings)
    except ValueError as e:  # a LoRA target the native decoder lacks
        raise ConfigError("lora.target_modules", str(e)) from None
    print(format_plan(plan, settings, describe))
    return plan


def model_shape(cfg: PlanConfig) -> tuple[GPTConfig, str]:
    """The decoder's shape: the native config, or a Llama-family config.json mapped onto it."""
    if cfg.model.kind == "hf":
        from codex_ml.models.convert import gpt_config_from_llama
        from codex_ml.models.hf import check_model_dir, hf_config

        assert cfg.model.path is not None  # validate_model requires it
        check_model_dir(cfg.model.path)
        shape = gpt_config_from_llama(hf_config(cfg.model.path, cfg.model.trust_remote_code))
        return shape, f"{Path(cfg.model.path).name} (Llama family)"
    from codex_ml.recipes.models import native_config

    # the vocabulary the tokenizer will have: tokenizer.vocab_size, padded as train pads it
    shape = native_config(cfg, cfg.tokenizer.vocab_size)
    return shape, f"native {cfg.model.preset}"


def memory_settings(cfg: PlanConfig, model: GPTConfig) -> MemorySettings:
    t = cfg.training
    strategy = t.strategy
    if strategy == "auto":  # as train resolves it: one process none, several ddp
        strategy = "ddp" if cfg.world_size > 1 else "none"
    seq_len = cfg.data.seq_len or model.max_seq_len
    if cfg.data.seq_len is None and cfg.model.kind == "hf":  # as train picks the window of an HF model
        from codex_ml.models.hf import DEFAULT_CONTEXT

        seq_len = min(seq_len, DEFAULT_CONTEXT)
    return MemorySettings(
        strategy=strategy,
        world_size=cfg.world_size,
        batch_size=t.batch_size,
        seq_len=seq_len,
        weight_dtype=cfg.model.dtype,
        precision=t.precision,
        activation_checkpointing=cfg.model.activation_checkpointing,
        reshard_after_forward=t.fsdp.reshard_after_forward,
        compiled=t.compile,
        lora_rank=cfg.lora.r if cfg.lora.enabled else 0,
        lora_targets=tuple(cfg.lora.target_modules) or NATIVE_LINEARS,
    )


def format_bytes(n: float) -> str:
    """Binary units, three significant figures or so: 19.5 MiB, 1.17 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if n < 10 * size else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_plan(plan: MemoryPlan, c: MemorySettings, describe: str) -> str:
    ranks = f"{c.world_size} rank{'s' if c.world_size > 1 else ''}"
    lines = [
        f"model: {describe}; {plan.total_parameters:,} parameters, {plan.trainable_parameters:,} trainable",
        f"strategy {c.strategy} on {ranks}; micro-batch {c.batch_size} x {c.seq_len} tokens per rank; "
        f"model.dtype {c.weight_dtype}, training.precision {c.precision}",
        "",
        f"{'per rank':<13} {'memory':>11}  how",
    ]
    lines += [f"{r.name:<13} {format_bytes(r.bytes):>11}  {r.formula}" for r in plan.rows]
    lines.append(f"{'total':<13} {format_bytes(plan.total):>11}  before the CUDA context and allocator slack")
    lines.append("formulas: docs/distributed.md (Memory planning)")
    return "\n".join(lines)
