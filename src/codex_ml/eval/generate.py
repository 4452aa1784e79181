"""Batched sampling with the KV cache: greedy, temperature, top-k, top-p, stop sequences, n per prompt.

Prompts of different lengths are left-padded; padded positions are masked out of attention and
rotary positions start at each prompt's first real token, so a prompt decodes the same alone or
in a batch. Rows that finish (end-of-text or a stop sequence) leave the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from codex_ml.models.gpt import GPT, StaticKVCache

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from codex_ml.tokenizer.core import CodeTokenizer


@dataclass
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    n: int = 1  # samples per prompt
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    compile: bool = False  # a static cache and a compiled decoding step (CUDA graphs on GPU)


@dataclass
class Completion:
    text: str  # the generated text, cut before the first stop sequence
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop sequence), "eos", or "length"


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the ``top_k`` most likely tokens and the smallest set whose probability reaches ``top_p``."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # the token that crosses top_p stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_tokens(logits: torch.Tensor, s: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / s.temperature, s.top_k, s.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _first_stop(text: str, stops: list[str]) -> int:
    cuts = [i for i in (text.find(st) for st in stops if st) if i >= 0]
    return min(cuts) if cuts else -1


@torch.inference_mode()
def generate(
    model: torch.nn.Module, tokenizer: CodeTokenizer, prompts: list[str] | list[list[int]], s: SamplingSettings
) -> list[list[Completion]]:
    """``s.n`` completions of each prompt (text, or token ids), in order: our KV-cache decoder for the native model,
    Hugging Face's ``generate`` for other causal LMs (same settings, same stop handling)."""
    if isinstance(model, GPT):
        return _generate_native(model, tokenizer, prompts, s)
    return _generate_hf(cast("PreTrainedModel", model), tokenizer, prompts, s)  # any other model is a causal LM of transformers


def _finish(tokenizer: CodeTokenizer, ids: list[int], s: SamplingSettings, eos_seen: bool) -> Completion:
    text = tokenizer.decode(ids)
    cut = _first_stop(text, s.stop) if s.stop else -1
    if cut >= 0:
        return Completion(text[:cut], ids, "stop")
    return Completion(text, ids, "eos" if eos_seen else "length")


def _generate_hf(
    model: PreTrainedModel, tokenizer: CodeTokenizer, prompts: list[str] | list[list[int]], s: SamplingSettings
) -> list[list[Completion]]:
    device = next(model.parameters()).device
    encoded = [(list(p) if isinstance(p, list) else tokenizer.encode(p)) or [tokenizer.eos_id] for p in prompts]
    longest = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), longest), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, longest - len(e) :] = torch.tensor(e)
        mask[i, longest - len(e) :] = 1
    torch.manual_seed(s.seed)
    sampling = (
        {"do_sample": True, "temperature": s.temperature, "top_k": s.top_k or None, "top_p": s.top_p}
        if s.temperature > 0
        else {"do_sample": False}
    )
    # generate comes from GenerationMixin, which the checker resolves through nn.Module's __getattr__
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=s.max_new_tokens,  # type: ignore[operator]
        num_return_sequences=s.n,
        pad_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eos_id,
        **sampling,
    )
    results = []
    for i in range(len(prompts)):
        group = []
        for j in range(s.n):
            new = out[i * s.n + j, longest:].tolist()
            eos = tokenizer.eos_id in new
            group.append(_finish(tokenizer, new[: new.index(tokenizer.eos_id)] if eos else new, s, eos))
        results.append(group)
    return results


class _Rows:
    """What each row has generated, and why it stopped."""

    def __init__(self, n_rows: int, tokenizer: CodeTokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.generated: list[list[int]] = [[] for _ in range(n_rows)]
        self.texts = [""] * n_rows
        self.reasons = ["length"] * n_rows
        self.done = [False] * n_rows

    def observe(self, rows: list[int], tokens: list[int]) -> list[int]:
        """Record one token per row; the positions (in ``rows``) of rows that just finished."""
        finished = []
        for j, (row, t) in enumerate(zip(rows, tokens)):
            if self.done[row]:
                continue
            if t == self.tokenizer.eos_id:
                self.reasons[row], self.done[row] = "eos", True
                finished.append(j)
                continue
            self.generated[row].append(t)
            if self.stops:
                text = self.tokenizer.decode(self.generated[row])
                cut = _first_stop(text, self.stops)
                if cut >= 0:
                    self.texts[row], self.reasons[row], self.done[row] = text[:cut], "stop", True
                    finished.append(j)
        return finished

    def completions(self, n: int) -> list[list[Completion]]:
        out = []
        for i in range(0, len(self.generated), n):
            group = []
            for row in range(i, i + n):
                text = self.texts[row] if self.reasons[row] == "stop" else self.tokenizer.decode(self.generated[row])
                group.append(Completion(text, self.generated[row], self.reasons[row]))
            out.append(group)
        return out


def _decode_step(model: GPT) -> Callable[..., torch.Tensor]:
    """The one-token decoding step, compiled once per model (CUDA graphs on GPU)."""
    step = getattr(model, "_codex_ml_decode_step", None)
    if step is None:

        def decode(
            tok: torch.Tensor, pos: torch.Tensor, key_valid: torch.Tensor, cols: torch.Tensor, cache: StaticKVCache
        ) -> torch.Tensor:
            # keys written so far (this step's included), as far as each row may see them
            mask = (key_valid & (cols <= cache.slot))[:, None, None, :]
            return model(tok, position_ids=pos, attn_mask=mask, kv_cache=cache)[:, -1]

        if model.lm_head.weight.is_cuda:
            step = torch.compile(decode, mode="reduce-overhead", dynamic=False)  # CUDA graphs
        else:
            # a C++ wrapper around the kernels: on CPU, per-step Python overhead is most of decoding
            step = torch.compile(decode, dynamic=False, options={"cpp_wrapper": True})
        # a plain attribute, not a submodule: nn.Module's __setattr__ is typed for tensors and modules only
        model._codex_ml_decode_step = step  # type: ignore[assignment]
    return step


def _generate_native(
    model: GPT, tokenizer: CodeTokenizer, prompts: list[str] | list[list[int]], s: SamplingSettings
) -> list[list[Completion]]:
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    if device.type == "cpu":
        # one matmul instead of three (q/k/v) and two (gate/up): on CPU each op's overhead counts; under
        # CUDA graphs launches cost nothing and fresh weight copies would be new graph inputs every call
        model.fuse_for_inference()
    try:
        return _sample_native(model, tokenizer, prompts, s, device)
    finally:
        model.unfuse().train(was_training)


def _sample_native(
    model: GPT, tokenizer: CodeTokenizer, prompts: list[str] | list[list[int]], s: SamplingSettings, device: torch.device
) -> list[list[Completion]]:
    encoded = [list(p) if isinstance(p, list) else tokenizer.encode(p) for p in prompts]
    rows = [(ids or [tokenizer.eos_id]) for ids in encoded for _ in range(s.n)]  # empty: start after a document
    if not rows:
        return []
    longest = max(len(r) for r in rows)
    context = model.config.max_seq_len
    if longest >= context:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the model's context of {context}")
    max_new = min(s.max_new_tokens, context - longest)
    generator = torch.Generator(device=device).manual_seed(s.seed) if s.temperature > 0 else None

    B, total = len(rows), longest + max_new
    input_ids = torch.full((B, longest), tokenizer.pad_id, dtype=torch.long)
    key_valid = torch.zeros((B, total), dtype=torch.bool)  # keys a row may attend to: its prompt, then all it writes
    for i, r in enumerate(rows):
        input_ids[i, longest - len(r) :] = torch.tensor(r)
        key_valid[i, longest - len(r) :] = True
    input_ids, key_valid = input_ids.to(device), key_valid.to(device)
    padded = any(len(r) != longest for r in rows)
    positions = (key_valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
    track = _Rows(B, tokenizer, s.stop)
    if s.compile:
        _decode_static(model, input_ids, positions, key_valid, max_new, s, generator, track)
    else:
        _decode_dynamic(model, input_ids, positions, key_valid, padded, max_new, s, generator, track)
    return track.completions(s.n)


def _decode_dynamic(
    model: GPT,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor,
    padded: bool,
    max_new: int,
    s: SamplingSettings,
    generator: torch.Generator | None,
    track: _Rows,
) -> None:
    """Eager decoding: the cache grows with the sequence, finished rows leave the batch."""
    B, longest = input_ids.shape
    device = input_ids.device
    cache = model.new_kv_cache(B, longest + max_new)
    if padded:
        causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        logits = model(
            input_ids, position_ids=positions, attn_mask=causal[None, None] & key_valid[:, None, None, :longest], kv_cache=cache
        )[:, -1]
    else:
        logits = model(input_ids, kv_cache=cache)[:, -1]
    next_pos = positions[:, -1] + 1
    alive = torch.arange(B, device=device)  # which original row each batch row is
    for step in range(max_new):
        tok = next_tokens(logits, s, generator)
        finished = track.observe(alive.tolist(), tok.tolist())
        if step == max_new - 1:
            break
        if finished:
            gone = set(finished)
            keep = torch.tensor([j for j in range(len(alive)) if j not in gone], dtype=torch.long, device=device)
            if keep.numel() == 0:
                break
            alive, tok, next_pos, key_valid = alive[keep], tok[keep], next_pos[keep], key_valid[keep]
            cache.reorder(keep)
        if padded:
            mask = key_valid[:, None, None, : cache.length + 1]
            logits = model(tok[:, None], position_ids=next_pos[:, None], attn_mask=mask, kv_cache=cache)[:, -1]
        else:
            logits = model(tok[:, None], kv_cache=cache)[:, -1]
        next_pos = next_pos + 1


_CACHE_BUCKET = 128


def _decode_static(
    model: GPT,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor,
    max_new: int,
    s: SamplingSettings,
    generator: torch.Generator | None,
    track: _Rows,
) -> None:
    """Compiled decoding: fixed shapes (a static cache spanning every position, all rows kept to the
    end), so one compiled step, or one CUDA graph, serves every token."""
    B, longest = input_ids.shape
    device = input_ids.device
    # round the cache up, so prompts of other lengths reuse the compiled step instead of recompiling
    total = min(model.config.max_seq_len, -(-(longest + max_new) // _CACHE_BUCKET) * _CACHE_BUCKET)
    key_valid = F.pad(key_valid, (0, total - key_valid.shape[1]), value=False)
    cache = model.new_kv_cache(B, total, static=True)
    cols = torch.arange(total, device=device)
    causal = cols[None, :] <= torch.arange(longest, device=device)[:, None]  # (longest, total)
    logits = model(input_ids, position_ids=positions, attn_mask=(causal[None] & key_valid[:, None])[:, None], kv_cache=cache)[
        :, -1
    ]
    step_fn = _decode_step(model)
    next_pos = positions[:, -1:] + 1
    rows = list(range(B))
    for step in range(max_new):
        tok = next_tokens(logits, s, generator)
        track.observe(rows, tok.tolist())
        if step == max_new - 1 or all(track.done):
            break
        logits = step_fn(tok[:, None], next_pos, key_valid, cols, cache)
        next_pos = next_pos + 1
