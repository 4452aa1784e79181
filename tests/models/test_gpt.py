"""The native decoder: shapes, causality, the KV cache, GQA, tied weights, save and load."""

import pytest
import torch

from codex_ml.models.gpt import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=48)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_logits_shape_and_causality():
    m = tiny()
    x = torch.randint(0, 97, (2, 16))
    y = m(x)
    assert y.shape == (2, 16, 97)
    # changing a later token must not change earlier logits
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 97
    torch.testing.assert_close(m(x2)[:, :10], y[:, :10])
    assert not torch.allclose(m(x2)[:, 10:], y[:, 10:])


def test_kv_cache_decoding_equals_full_forward():
    m = tiny()
    x = torch.randint(0, 97, (3, 20))
    full = m(x)
    cache = m.new_kv_cache(3, 20)
    parts = [m(x[:, :12], kv_cache=cache)]
    for t in range(12, 20):
        parts.append(m(x[:, t : t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_position_ids_and_mask_match_unpadded():
    """A left-padded row with shifted positions and a padding mask gives the unpadded logits."""
    m = tiny()
    x = torch.randint(0, 97, (1, 10))
    ref = m(x)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    valid = torch.tensor([[False] * 3 + [True] * 10])
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = torch.ones(13, 13, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    out = m(padded, position_ids=pos, attn_mask=mask)
    torch.testing.assert_close(out[:, 3:], ref, atol=1e-5, rtol=1e-5)


def test_gqa_and_mha_parameter_counts():
    mha, gqa = tiny(n_kv_head=4), tiny(n_kv_head=1)
    assert gqa.num_params() < mha.num_params()
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (8, 32)


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(vocab_size=10, d_model=30, n_head=4, n_kv_head=4)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(vocab_size=10, d_model=32, n_head=4, n_kv_head=3)


def test_too_long_sequence_is_refused():
    m = tiny(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_save_and_load_round_trip_with_tied_embeddings(tmp_path):
    from codex_ml.recipes.checkpoints import load_native_checkpoint
    from codex_ml.recipes.models import native_weight_files

    m = tiny(tie_embeddings=True).eval()
    assert m.lm_head.weight is m.embed_tokens.weight
    for name, data in native_weight_files(m).items():
        (tmp_path / name).write_bytes(data)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model_config.json").exists()
    loaded = load_native_checkpoint(tmp_path, torch.device("cpu"))
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(loaded(x), m(x))


def test_flops_per_token_counts_weights_and_attention():
    m = tiny()
    n = m.num_params(non_embedding=True)
    assert m.flops_per_token(16) == 6 * n + 12 * 2 * 4 * 8 * 16


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 97, (2, 16))
    grads = []
    for ckpt in (False, True):
        m = tiny().train()
        m.gradient_checkpointing = ckpt
        m(x).sum().backward()
        grads.append(m.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_several_tokens_on_a_filled_cache_without_a_mask_are_refused():
    """Without a mask, 4 new queries over 12 + 4 keys would attend to each other's future: refuse."""
    m = tiny()
    x = torch.randint(0, 97, (2, 16))
    cache = m.new_kv_cache(2, 16)
    m(x[:, :12], kv_cache=cache)
    with pytest.raises(
        ValueError,
        match=r"shape \(2, 4\) on a KV cache already holding 12 positions needs attn_mask "
        r"\(B, 1, 4, 16\)",
    ):
        m(x[:, 12:], kv_cache=cache)
    static = m.new_kv_cache(2, 16, static=True)
    with pytest.raises(ValueError, match=r"shape \(2, 12\) on a StaticKVCache of 16 positions needs attn_mask"):
        m(x[:, :12], position_ids=torch.arange(12).expand(2, -1), kv_cache=static)


def test_chunked_prefill_with_a_causal_mask_equals_the_full_forward():
    m = tiny()
    x = torch.randint(0, 97, (2, 20))
    full = m(x)
    cache = m.new_kv_cache(2, 20)
    parts = [m(x[:, :8], kv_cache=cache)]
    for start in (8, 14):  # chunks of 6 new tokens, each seeing the cache and its own past
        keys = torch.arange(start + 6)
        mask = (keys[None, :] <= torch.arange(start, start + 6)[:, None])[None, None]
        parts.append(m(x[:, start : start + 6], attn_mask=mask, kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
