"""SlotKVCache: sequences in separate slots, written at their own positions, give the full forward's logits."""

from __future__ import annotations

import torch

from codex_ml.models.gpt import GPT, GPTConfig, SlotKVCache


def test_slot_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=16)).eval()
    seqs = [torch.randint(0, 64, (n,)) for n in (5, 9, 3)]
    cache = SlotKVCache(model.config, 4, 16, "cpu", torch.float32)
    cols = torch.arange(16)
    with torch.no_grad():
        for slot, s in enumerate(seqs):  # prefill each sequence alone in its slot, all but its last token
            pos = torch.arange(len(s) - 1)[None]
            cache.bind(slice(slot, slot + 1), pos)
            model(s[None, :-1], position_ids=pos, attn_mask=(cols[None, :] <= pos[0, :, None])[None, None], kv_cache=cache)
        # one decoding step for all three at their own positions (slot 3 idle)
        tok = torch.tensor([[s[-1]] for s in seqs] + [[0]])
        pos = torch.tensor([[len(s) - 1] for s in seqs] + [[0]])
        cache.bind(slice(0, 4), pos)
        step = model(tok, position_ids=pos, attn_mask=(cols[None, :] <= pos)[:, None, None, :], kv_cache=cache)[:, -1]
        for i, s in enumerate(seqs):
            full = model(s[None])[0, -1]
            torch.testing.assert_close(step[i], full, rtol=1e-5, atol=1e-5)


def test_a_shorter_span_reads_less_and_changes_nothing():
    """Attention over the first ``span`` positions equals attention over the whole cache: what lies past
    every row's position is masked either way (the scheduler reads only up to the furthest one in use)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64)).eval()
    seqs = [torch.randint(0, 64, (n,)) for n in (5, 20, 11, 2)]
    cols = torch.arange(64)
    outputs = []
    for span in (None, 32):  # the whole cache, then the first 32 positions (every position used is below 21)
        cache = SlotKVCache(model.config, 4, 64, "cpu", torch.float32)
        cache.k[0].normal_()  # whatever an earlier sequence left in the slots must not matter either
        with torch.no_grad():
            for slot, s in enumerate(seqs):
                pos = torch.arange(len(s) - 1)[None]
                width = span or 64
                cache.bind(slice(slot, slot + 1), pos, span)
                mask = (cols[None, :width] <= pos[0, :, None])[None, None]
                model(s[None, :-1], position_ids=pos, attn_mask=mask, kv_cache=cache)
            tok, pos = torch.tensor([[s[-1]] for s in seqs]), torch.tensor([[len(s) - 1] for s in seqs])
            cache.bind(slice(0, 4), pos, span)
            mask = (cols[None, : span or 64] <= pos)[:, None, None, :]
            outputs.append(model(tok, position_ids=pos, attn_mask=mask, kv_cache=cache)[:, -1])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)
