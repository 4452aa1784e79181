"""Conversion between the native decoder and Hugging Face's ``LlamaForCausalLM``.

The native model's parameter names are Llama's without the ``model.`` prefix of the decoder body,
so conversion is a rename plus a config translation; no tensor is reshaped or permuted (both use
the half-rotation RoPE layout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from codex_ml.errors import CodexError
from codex_ml.models.gpt import GPT, GPTConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel


class ConversionError(CodexError):
    """A Hugging Face model the native decoder cannot represent exactly."""


def to_hf_name(native: str) -> str:
    return native if native.startswith("lm_head.") else f"model.{native}"


def to_native_name(hf: str) -> str:
    return hf[len("model.") :] if hf.startswith("model.") else hf


def llama_config(config: GPTConfig, **token_ids: Any) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.dropout,
        initializer_range=config.init_std,
        architectures=["LlamaForCausalLM"],
        **token_ids,
    )


def native_to_hf(model: GPT, **token_ids: Any) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with the native model's weights (fp32 unless the model is not)."""
    from transformers import LlamaForCausalLM

    dtype = model.lm_head.weight.dtype
    hf = LlamaForCausalLM(llama_config(model.config, **token_ids)).to(dtype)  # type: ignore[arg-type]  # transformers types .to() through a decorator that loses self
    state = {to_hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"weights do not map onto LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.eval() if not model.training else hf


def gpt_config_from_llama(hf_config: PretrainedConfig) -> GPTConfig:
    """The native config of a Llama-family HF config; refuses what the native model lacks."""
    c = hf_config
    problems = []
    if getattr(c, "model_type", None) not in ("llama",):
        problems.append(f"model_type {getattr(c, 'model_type', None)!r} (only llama maps exactly)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        problems.append("biases in attention or MLP")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"activation {c.hidden_act}")
    rope = getattr(c, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(f"head_dim {head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}")
    if problems:
        raise ConversionError("cannot load into the native decoder exactly: " + "; ".join(problems))
    theta = rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else getattr(c, "rope_theta", 10000.0)
    return GPTConfig(
        vocab_size=c.vocab_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_kv_head=c.num_key_value_heads or c.num_attention_heads,
        d_model=c.hidden_size,
        d_ff=c.intermediate_size,
        max_seq_len=c.max_position_embeddings,
        rope_theta=float(theta),
        norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )


def hf_to_native(hf_model: PreTrainedModel) -> GPT:
    """The native decoder with a Llama-family HF model's weights."""
    config = gpt_config_from_llama(hf_model.config)
    model = GPT(config).to(next(hf_model.parameters()).dtype)
    state = {to_native_name(k): v for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"weights do not map onto the native decoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
