"""LoRA targets: the default follows the architecture (PEFT's rule); names that match nothing are refused."""

import warnings

import pytest
import torch
import transformers as tf

from codex_ml.errors import CodexError
from codex_ml.models.gpt import GPT, GPTConfig
from codex_ml.models.lora import apply_lora, resolve_target_modules

V, D = 64, 32
LLAMA_LIKE = dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)

# name -> (a tiny model, the layers PEFT 0.21's default for its model_type wraps, by last name component)
ARCHITECTURES = {
    "native": (
        lambda: GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=D, d_ff=64, max_seq_len=64)),
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    ),  # all-linear
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA_LIKE)), {"q_proj", "v_proj"}),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**LLAMA_LIKE)), {"q_proj", "v_proj"}),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=64)), {"c_attn"}),
    "gpt_neox": (
        lambda: tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        ),
        {"query_key_value"},
    ),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=D, n_layer=2, n_head=4)), {"query_key_value"}),
    "phi": (
        lambda: tf.PhiForCausalLM(
            tf.PhiConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        ),
        {"q_proj", "v_proj", "fc1", "fc2"},
    ),
    # no PEFT default for phi3: all-linear, which here means its fused qkv_proj and gate_up_proj
    "phi3": (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**LLAMA_LIKE)), {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[name][0]()


def model_type(model) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None) if not isinstance(model, GPT) else None


def wrapped_layers(peft_model) -> list[str]:
    """Full names of the layers PEFT put an adapter on."""
    return [name for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_default_targets_follow_the_architecture(arch):
    model = build(arch)
    targets = resolve_target_modules(model, [], model_type(model))
    expected = ARCHITECTURES[arch][1]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out")  # PEFT correcting our config for Conv1D
        peft_model = apply_lora(
            model, r=2, alpha=4, dropout=0.0, target_modules=targets.names, causal_lm=not isinstance(model, GPT)
        )
    wrapped = wrapped_layers(peft_model)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == expected
    assert len(wrapped) == 2 * len(expected)  # every block's, in both blocks
    assert not any(name.endswith("lm_head") for name in wrapped)
    line = targets.describe()
    assert all(kind in line for kind in expected) and f"{2 * len(expected)} layers" in line
    assert ("all-linear" in targets.rule) == (arch in ("native", "phi3"))


def test_adapted_model_trains_only_its_adapters():
    model = build("gpt_neox")
    peft_model = apply_lora(model, 2, 4, 0.0, resolve_target_modules(model, [], "gpt_neox").names, causal_lm=True)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("requested,unmatched", [(["q_proj", "v_proj"], "q_proj, v_proj"), (["c_attn", "dense"], "dense")])
def test_explicit_targets_that_match_nothing_are_refused(requested, unmatched):
    model = build("gpt2")  # Llama's names on GPT-2's fused Conv1D layers
    with pytest.raises(CodexError, match="lora.target_modules") as e:
        resolve_target_modules(model, requested, "gpt2")
    assert f"{unmatched} match no linear layer" in str(e.value) and "c_attn" in str(e.value).split("layers are:")[1]
    with pytest.raises(CodexError, match=unmatched):
        apply_lora(model, 2, 4, 0.0, requested, causal_lm=True)


def test_explicit_targets_are_kept_as_given_full_names_too():
    model = build("gpt2")
    targets = resolve_target_modules(model, ["transformer.h.1.mlp.c_fc", "c_proj"], "gpt2")
    assert targets.names == ["transformer.h.1.mlp.c_fc", "c_proj"] and targets.rule == "lora.target_modules"
    wrapped = wrapped_layers(apply_lora(model, 2, 4, 0.0, targets.names, causal_lm=True))
    assert sorted(wrapped) == sorted(
        [
            "base_model.model.transformer.h.1.mlp.c_fc",
            *(f"base_model.model.transformer.h.{i}.{p}.c_proj" for i in (0, 1) for p in ("attn", "mlp")),
        ]
    )


def test_a_default_that_matches_nothing_says_to_name_the_targets():
    """A model_type PEFT knows, on a model whose layers are named otherwise (remote code reusing a type)."""
    model = build("gpt2")
    with pytest.raises(CodexError, match=r"PEFT's default for llama .*lora.target_modules=\[") as e:
        resolve_target_modules(model, [], "llama")
    assert "c_attn" in str(e.value)
