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
