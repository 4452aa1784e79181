"""Generation: greedy is deterministic, batches equal single prompts, stops and filters work, and the
fast path (static cache, compiled step) gives the same greedy tokens as the plain one."""

import pytest
import torch

from codex_ml.eval.generate import SamplingSettings, filter_logits, generate
from codex_ml.models.convert import native_to_hf
from codex_ml.models.gpt import GPT, GPTConfig


class IdTokenizer:
    """Token ids as text, so tests can reason about exact tokens."""

    eos_id, pad_id = 0, 1

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=96)).eval()


PROMPTS = ["5 6 7 8 9 10", "11 12", "13"]


def test_greedy_is_deterministic_and_batches_equal_single_prompts(model):
    tok = IdTokenizer()
    s = SamplingSettings(max_new_tokens=12, temperature=0)
    batched = generate(model, tok, PROMPTS, s)
    assert generate(model, tok, PROMPTS, s) == batched
    for prompt, group in zip(PROMPTS, batched):
        assert generate(model, tok, [prompt], s)[0][0].token_ids == group[0].token_ids


def test_greedy_equals_argmax_of_full_forward(model):
    tok = IdTokenizer()
    ids = tok.encode(PROMPTS[0])
    out = generate(model, tok, [PROMPTS[0]], SamplingSettings(max_new_tokens=6, temperature=0))[0][0]
    seq = list(ids)
    for t in out.token_ids:
        with torch.no_grad():
            assert model(torch.tensor([seq]))[0, -1].argmax().item() == t
        seq.append(t)


def test_fast_path_gives_the_same_greedy_tokens(model):
    tok = IdTokenizer()
    plain = generate(model, tok, PROMPTS, SamplingSettings(max_new_tokens=10, temperature=0, n=2))
    fast = generate(model, tok, PROMPTS, SamplingSettings(max_new_tokens=10, temperature=0, n=2, compile=True))
    assert [[c.token_ids for c in g] for g in plain] == [[c.token_ids for c in g] for g in fast]


def test_fast_path_follows_new_prompt_lengths_and_new_weights():
    # the compiled step is reused across calls: it must not keep stale shapes or weights
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=300)).eval()
    tok = IdTokenizer()
    greedy, fast = (
        SamplingSettings(max_new_tokens=8, temperature=0),
        SamplingSettings(max_new_tokens=8, temperature=0, compile=True),
    )
    for prompt in ["5", "5 6 7 8 9 10 11 12 13"]:
        assert generate(m, tok, [prompt], fast)[0][0].token_ids == generate(m, tok, [prompt], greedy)[0][0].token_ids
    before = generate(m, tok, ["5 6"], fast)[0][0].token_ids
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = generate(m, tok, ["5 6"], fast)[0][0].token_ids
    assert after == generate(m, tok, ["5 6"], greedy)[0][0].token_ids
    assert after != before
    assert all(b.self_attn.fused_qkv is None for b in m.layers)  # no inference copies left behind


def test_hf_generate_path_matches_ours(model):
    tok = IdTokenizer()
    hf = native_to_hf(model, eos_token_id=0, pad_token_id=1).eval()
    s = SamplingSettings(max_new_tokens=8, temperature=0)
    assert generate(hf, tok, PROMPTS[:1], s)[0][0].token_ids == generate(model, tok, PROMPTS[:1], s)[0][0].token_ids


def test_sampling_is_seeded_and_n_samples_differ(model):
    tok = IdTokenizer()
    s = SamplingSettings(max_new_tokens=10, temperature=1.0, n=4, seed=7)
    a, b = generate(model, tok, ["5 6"], s), generate(model, tok, ["5 6"], s)
    assert a == b
    assert len({tuple(c.token_ids) for c in a[0]}) > 1
    other = generate(model, tok, ["5 6"], SamplingSettings(max_new_tokens=10, temperature=1.0, n=4, seed=8))
    assert other != a


def test_stop_sequences_cut_the_text(model):
    tok = IdTokenizer()
    full = generate(model, tok, ["5 6"], SamplingSettings(max_new_tokens=10, temperature=0))[0][0]
    stop = f" {full.token_ids[3]}"
    cut = generate(model, tok, ["5 6"], SamplingSettings(max_new_tokens=10, temperature=0, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    probs = logits.softmax(-1)[0]
    kept = ~torch.isinf(filter_logits(logits, 0, 0.8)[0])
    # the smallest prefix of the sorted distribution whose mass reaches 0.8
    assert kept.tolist() == [True, True, False, False, False] and probs[:2].sum() >= 0.8 > probs[:1].sum()


def test_a_prompt_longer_than_the_context_is_refused(model):
    with pytest.raises(ValueError, match="context"):
        generate(model, IdTokenizer(), [" ".join(["5"] * 100)], SamplingSettings(max_new_tokens=4))
