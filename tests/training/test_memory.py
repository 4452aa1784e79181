"""`codex-ml plan`'s arithmetic: parameter counts against real models, figures against a hand
computation, activation formulas against the tensors autograd really keeps, and the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from codex_ml.conf.schema import ConfigError, LoraConfig, PlanConfig
from codex_ml.models.gpt import GPT, GPTConfig
from codex_ml.recipes.models import native_loss_sum
from codex_ml.recipes.plan import plan_command
from codex_ml.training.memory import (
    NATIVE_LINEARS,
    MemorySettings,
    block_activation_bytes,
    count_parameters,
    lora_parameters,
    plan_memory,
)
from helpers import run_cli

# two blocks, grouped-query attention (4 heads, 2 kv heads), untied: small enough to count by hand
SMALL = GPTConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=64)


def settings(**kw) -> MemorySettings:
    base = dict(strategy="none", world_size=1, batch_size=2, seq_len=32, weight_dtype="fp32", precision="fp32")
    return MemorySettings(**{**base, **kw})


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        GPTConfig(vocab_size=256, n_layer=3, n_head=6, n_kv_head=6, d_model=48, d_ff=80, tie_embeddings=True),
        GPTConfig(vocab_size=128, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=40),
    ],
)
def test_parameter_count_is_the_real_models(config: GPTConfig) -> None:
    model = GPT(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


def test_lora_count_is_peft_trainable_count() -> None:
    from codex_ml.models.lora import apply_lora

    for targets in (NATIVE_LINEARS, ("q_proj", "v_proj", "lm_head")):
        peft_model = apply_lora(GPT(SMALL), r=4, alpha=8, dropout=0.0, target_modules=list(targets), causal_lm=False)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert lora_parameters(SMALL, 4, targets) == trainable


def test_figures_match_a_hand_computation() -> None:
    # per block: q 64*64 + k 64*32 + v 64*32 + o 64*64 + 3 * 64*96 + two norms 2*64 = 30,848;
    # root: embedding and head 2 * 320*64 + final norm 64 = 41,024; total 2*30,848 + 41,024 = 102,720
    n = 102_720
    fsdp = plan_memory(SMALL, settings(strategy="fsdp", world_size=4))
    assert fsdp.total_parameters == n
    assert fsdp.row("parameters").bytes == n * 4 / 4
    assert fsdp.row("gradients").bytes == n * 4 / 4
    assert fsdp.row("optimizer").bytes == 2 * n * 4 / 4
    # activations in fp32, per token: a block keeps 32*64 + 8*32 + 4*4 + 16*96 + 8 = 3,864 bytes; after the
    # blocks the final norm 4 + 8*64, the fused loss's hidden gradient 4*64, the token ids 8: 780 bytes;
    # 64 tokens x (2*3,864 + 788) + the output weight's fp32 gradient 4*320*64
    assert fsdp.row("activations").bytes == 64 * (2 * 3_864 + 780) + 4 * 320 * 64
    # the same job replicated: every rank holds everything, and DDP's buckets copy the gradients
    ddp = plan_memory(SMALL, settings(strategy="ddp", world_size=4))
    assert ddp.row("parameters").bytes == n * 4
    assert ddp.row("optimizer").bytes == 2 * n * 4
    assert ddp.row("buffers").bytes == n * 4
    assert ddp.row("activations").bytes == fsdp.row("activations").bytes
    # LoRA r=4 on the seven projections: 2 blocks x 4 x (128 + 96 + 96 + 128 + 160 + 160 + 160) = 7,424 trainable in fp32
    lora = plan_memory(SMALL, settings(lora_rank=4))
    assert lora.trainable_parameters == 7_424
    assert lora.row("parameters").bytes == n * 4 + 7_424 * 4
    assert lora.row("optimizer").bytes == 2 * 7_424 * 4


def saved_activation_bytes(model: GPT, batch: dict, autocast: bool) -> int:
    """Bytes of every distinct storage autograd keeps for backward, parameters and buffers aside."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.enable_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        native_loss_sum(model)(batch).backward()
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("weights,precision", [("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")])
def test_activation_formula_is_what_autograd_keeps(weights: str, precision: str, checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = GPT(SMALL).to(torch.float32 if weights == "fp32" else torch.bfloat16)
    model.gradient_checkpointing = checkpointing
    ids = torch.randint(0, SMALL.vocab_size, (2, 32))
    measured = saved_activation_bytes(model, {"input_ids": ids, "labels": ids.clone()}, autocast=weights != precision)
    plan = plan_memory(SMALL, settings(weight_dtype=weights, precision=precision, activation_checkpointing=checkpointing))
    expected = plan.row("activations").bytes
    if checkpointing:  # forward keeps the blocks' inputs; backward recomputes one block at a time on top
        residual, compute = (4, 4) if weights == precision == "fp32" else (4, 2) if weights == "fp32" else (2, 2)
        expected -= 64 * block_activation_bytes(SMALL, residual, compute)
    elif weights != precision:  # autocast's copies of the weights are kept for backward too: the buffers row
        expected += plan.row("buffers").bytes
    assert measured == expected


def test_refuses_a_bad_strategy_or_world_size() -> None:
    with pytest.raises(ValueError, match="world_size"):
        plan_memory(SMALL, settings(world_size=0))
    with pytest.raises(ValueError, match="strategy"):
        plan_memory(SMALL, settings(strategy="zero3"))
    with pytest.raises(ValueError, match="no Linear named qkv"):
        plan_memory(SMALL, settings(lora_rank=4, lora_targets=("qkv",)))


FIGURE = re.compile(r"^(parameters|gradients|optimizer|activations|buffers|total)\s+([\d.]+) (B|KiB|MiB|GiB|TiB)", re.M)
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def composed(*overrides: str) -> PlanConfig:
    """The config `codex-ml plan OVERRIDES` runs with, composed by Hydra in this process."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from codex_ml.conf.store import register_schemas

    register_schemas()
    with initialize_config_module(config_module="codex_ml.conf", version_base=None):
        return OmegaConf.to_object(compose(config_name="plan", overrides=list(overrides)))


def test_plan_command_prints_the_sharded_table(capsys: pytest.CaptureFixture) -> None:
    common = ["model=large", "training.batch_size=4", "data.seq_len=512", "training.precision=bf16", "world_size=64"]
    plan_command(composed(*common, "training.strategy=ddp"))
    ddp = capsys.readouterr().out
    fsdp = run_cli("plan", *common, "training.strategy=fsdp").stdout  # the command itself, once
    f = {k: float(v) * UNITS[u] for k, v, u in FIGURE.findall(fsdp)}
    d = {k: float(v) * UNITS[u] for k, v, u in FIGURE.findall(ddp)}
    assert set(f) == set(d) == {"parameters", "gradients", "optimizer", "activations", "buffers", "total"}
    for kind in ("parameters", "gradients", "optimizer"):  # printed to three digits: a 64th within rounding
        assert d[kind] / f[kind] == pytest.approx(64, rel=0.01)
    assert "strategy fsdp on 64 ranks; micro-batch 4 x 512 tokens" in fsdp
    plan_command(composed(*common, "training.strategy=fsdp"))
    assert capsys.readouterr().out == fsdp


@pytest.mark.parametrize("override", ["world_size=0", "world_size=-3"])
def test_plan_command_refuses_a_world_size_below_one_in_one_line(override: str) -> None:
    proc = run_cli("plan", "model=large", "training.strategy=fsdp", override, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: world_size: must be >= 1")


def test_plan_refuses_a_lora_target_the_model_lacks() -> None:
    cfg = PlanConfig(lora=LoraConfig(enabled=True, target_modules=["qkv"]))
    with pytest.raises(ConfigError, match="no Linear named qkv") as e:
        plan_command(cfg)
    assert e.value.key == "lora.target_modules"


def save_hf_model(directory: Path, arch: str) -> torch.nn.Module:
    """A two-layer Hugging Face causal LM saved with a word-level tokenizer: all check_model_dir asks for."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4))
    model.save_pretrained(str(directory))
    Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(directory / "tokenizer.json"))
    return model


def test_plan_of_a_local_llama_counts_its_parameters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = save_hf_model(tmp_path / "llama", "llama")
    plan = plan_command(composed("model=hf", f"model.path={tmp_path / 'llama'}", "training.strategy=fsdp", "world_size=2"))
    assert plan.total_parameters == sum(p.numel() for p in model.parameters())
    assert plan.row("parameters").bytes == plan.total_parameters * 4 / 2
    assert "llama (Llama family)" in capsys.readouterr().out


def test_plan_refuses_an_architecture_it_cannot_map(tmp_path: Path) -> None:
    from codex_ml.errors import CodexError

    save_hf_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(CodexError, match="model_type 'gpt2'"):
        plan_command(composed("model=hf", f"model.path={tmp_path / 'gpt2'}"))
