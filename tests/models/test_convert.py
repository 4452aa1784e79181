"""Native decoder <-> LlamaForCausalLM: exact in both directions; non-Llama models are refused."""

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, Qwen2Config

from codex_ml.models.convert import ConversionError, gpt_config_from_llama, hf_to_native, native_to_hf
from codex_ml.models.gpt import GPT, GPTConfig


@pytest.mark.parametrize("tie", [False, True])
def test_native_to_hf_logits_match(tie):
    torch.manual_seed(0)
    native = GPT(
        GPTConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=64, tie_embeddings=tie)
    ).eval()
    hf = native_to_hf(native).eval()
    x = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (native(x) - hf(x).logits).abs().max() < 1e-5


def test_hf_llama_to_native_logits_match():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        )
    ).eval()
    native = hf_to_native(hf).eval()
    assert native.config.rope_theta == 500.0 and native.config.n_kv_head == 3
    x = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        assert (native(x) - hf(x).logits).abs().max() < 1e-5


def test_architectures_that_do_not_map_are_refused():
    with pytest.raises(ConversionError, match="qwen2"):
        gpt_config_from_llama(
            Qwen2Config(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        )
    with pytest.raises(ConversionError, match="gpt2"):
        gpt_config_from_llama(GPT2Config(vocab_size=10, n_embd=16, n_layer=1, n_head=2))
    cfg = LlamaConfig(
        vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, attention_bias=True
    )
    with pytest.raises(ConversionError, match="biases"):
        gpt_config_from_llama(cfg)
