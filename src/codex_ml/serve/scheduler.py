"""Continuous batching: one thread owns the model and decodes every running sequence together.

Each sequence lives in a slot of one preallocated KV cache (``SlotKVCache``) from its position 0,
so a sequence joins at the next step (its prompt is prefilled alone, then it decodes with the
others) and leaves the moment it finishes or its client goes away. Waiting sequences sit in a
bounded queue; ``submit`` refuses past it rather than letting the queue grow.

Batch invariance (a greedy sequence decodes the same tokens alone or among others): every decoding
step covers the slots ``0..hi`` with ``hi`` rounded up to a multiple of 4. On CPU, fp32 matrix
products take the same kernels for any batch of a multiple-of-4 rows, while 1 to 3 rows take other
kernels; attention is per row. A sequence keeps its slot for life. What is guaranteed and tested:
the same tokens, and logprobs within 1e-5 in fp32 (the last bits can still differ).
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from codex_ml.eval.generate import SamplingSettings, next_tokens

if TYPE_CHECKING:
    from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.models.gpt import GPT, SlotKVCache
from codex_ml.serve.hf_decoder import HFSlotDecoder

ROW_MULTIPLE = 4  # see the module docstring: decoding batches are padded to a multiple of this
SPAN_MULTIPLE = 32  # attention reads the cache up to the furthest position in use, rounded up to this
PREFILL_TOKEN_BUDGET = 2048  # prompt tokens prefilled between two decoding steps (at least one prompt)


class QueueFull(Exception):
    """More sequences are waiting than ``max_queue`` allows."""


@dataclass
class TokenEvent:
    """What one decoding step produced for one sequence (sent from the scheduler thread)."""

    token_id: int
    logprob: float | None  # of the chosen token, when logprobs were asked for
    top: list[tuple[int, float]] | None  # the most likely alternatives, when asked for
    text: str  # the whole completion so far (cut before a stop string once one matched)
    n_generated: int  # tokens sampled so far, the stop token included
    finish: str | None = None  # "stop", "length", or "cancelled" on the last event
    prompt_logprobs: list[float | None] | None = None  # on the first event, when asked for (echo)
    is_stop_token: bool = False  # the token ended the sequence (end-of-text, end of turn) and is not in the text


@dataclass
class Sequence:
    """One completion to generate: a prompt, its sampling settings and where its tokens go."""

    prompt_ids: list[int]
    settings: SamplingSettings  # max_new_tokens, temperature, top_k, top_p, seed, stop
    sink: Callable[[TokenEvent], None]  # called on the scheduler thread, once per token
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and k alternatives
    prompt_logprobs: bool = False
    request_id: str = ""
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Running:
    seq: Sequence
    generator: torch.Generator | None
    position: int  # where the next fed token is written
    last_token: int
    ids: list[int] = field(default_factory=list)  # generated, stop tokens excluded
    n_generated: int = 0
    text: str = ""
    first_token_at: float = 0.0


class Scheduler:
    """Owns the model: ``submit`` sequences from any thread; their events arrive through their sinks."""

    def __init__(
        self,
        model: GPT | HFSlotDecoder,
        tokenizer: CodeTokenizer,
        max_batch: int,
        max_queue: int,
        on_first_token: Callable[[float], None] | None = None,
        on_finished: Callable[[float, int], None] | None = None,
        compiled: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = model.config.max_seq_len
        self.device = model.lm_head.weight.device
        n_slots = -(-max_batch // ROW_MULTIPLE) * ROW_MULTIPLE
        p = model.lm_head.weight
        self.cache = SlotKVCache(model.config, n_slots, self.context, p.device, p.dtype)
        self.cols = torch.arange(self.context, device=self.device)
        self.slots: list[_Running | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.on_first_token, self.on_finished = on_first_token, on_finished
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="codex-ml-scheduler", daemon=True)
        self.error: BaseException | None = None
        self._compiled_step = self._compile_full_step() if compiled else None

    # ------------------------------------------------------------------ any thread

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); ``QueueFull`` past ``max_queue`` waiting."""
        for seq in seqs:  # the HTTP layer answers 400 before this; a caller that did not check fails here
            if not seq.prompt_ids or len(seq.prompt_ids) + seq.settings.max_new_tokens > self.context:
                raise ValueError(
                    f"{len(seq.prompt_ids)} prompt tokens + {seq.settings.max_new_tokens} new ones do not "
                    f"fit the context of {self.context}"
                )
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (serve.max_queue={self.max_queue})")
            self.waiting.extend(seqs)
            self._cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop these sequences; each frees its slot before the next decoding step."""
        with self._cv:
            for s in seqs:
                s.cancelled = True
            self._cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def running_requests(self) -> int:
        return len({s.seq.request_id for s in self.slots if s is not None})

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not self.waiting and not self.running and not self._stopping:
                            self._cv.wait()
                        if self._stopping and not self.waiting and not self.running:
                            return
                        admitted = self._admit()
                    for seq, slot in admitted:
                        self._prefill(seq, slot)
                    self._drop_cancelled()
                    if self.running:
                        self._decode_step()
        except Exception as e:  # the thread must not die silently: fail every sequence, keep the error for /health
            self.error = e
            print(f"error: the scheduler stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            with self._cv:
                self._stopping = True
                pending = [r.seq for r in self.slots if r] + list(self.waiting)
                self.waiting.clear()
                self.slots = [None] * self.max_batch
            for seq in pending:
                seq.sink(TokenEvent(-1, None, None, "", 0, finish="error"))

    def _admit(self) -> list[tuple[Sequence, int]]:
        """Waiting sequences moved into free slots, within the prefill budget (called under the lock)."""
        out: list[tuple[Sequence, int]] = []
        budget = PREFILL_TOKEN_BUDGET
        free = [i for i, s in enumerate(self.slots) if s is None]
        while self.waiting and free:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                seq.sink(TokenEvent(-1, None, None, "", 0, finish="cancelled"))
                continue
            if out and len(seq.prompt_ids) > budget:
                break
            self.waiting.popleft()
            budget -= len(seq.prompt_ids)
            slot = free.pop(0)
            self.slots[slot] = _Running(seq, None, 0, 0)  # reserved; filled by _prefill
            out.append((seq, slot))
        return out

    def _prefill(self, seq: Sequence, slot: int) -> None:
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
        n = ids.shape[1]
        positions = torch.arange(n, device=self.device)[None]
        span = attention_span(n, self.context)
        mask = (self.cols[None, :span] <= positions[0, :, None])[None, None]  # (1, 1, n, span): causal
        self.cache.bind(slice(slot, slot + 1), positions, span)
        # the output projection over the last position alone, unless the prompt's own logprobs are asked for
        if isinstance(self.model, GPT):
            hidden = self.model(ids, position_ids=positions, attn_mask=mask, kv_cache=self.cache, return_hidden=True)[0]
            logits = self.model.lm_head(hidden if seq.prompt_logprobs else hidden[-1:])
        else:
            keep = 0 if seq.prompt_logprobs else 1
            logits = self.model(ids, position_ids=positions, attn_mask=mask, kv_cache=self.cache, logits_to_keep=keep)[0]
        s = seq.settings
        generator = None
        if s.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(s.seed & (2**64 - 1))
        run = _Running(seq, generator, n, 0)
        self.slots[slot] = run
        prompt_lp = None
        if seq.prompt_logprobs:
            lp = torch.log_softmax(logits[:-1].float(), -1)
            chosen = lp.gather(-1, ids[0, 1:, None])[:, 0].tolist()
            prompt_lp = [None, *chosen]
        self._advance(slot, logits[-1:], prompt_lp)

    def _drop_cancelled(self) -> None:
        for i, run in enumerate(self.slots):
            if run is not None and run.seq.cancelled:
                self.slots[i] = None
                run.seq.sink(TokenEvent(-1, None, None, run.text, run.n_generated, finish="cancelled"))

    def _compile_full_step(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One decoding step over every slot and the whole context, compiled once, here (tens of seconds on
        CPU) rather than when the first requests wait: one shape, so nothing is ever recompiled, and every
        sequence decodes through the same graph whatever its company."""

        def full_step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            mask = (self.cols[None, :] <= pos)[:, None, None, :]
            self.cache.bind(slice(0, tok.shape[0]), pos, self.context)
            return self.model(tok, position_ids=pos, attn_mask=mask, kv_cache=self.cache)[:, -1]

        if self.device.type == "cuda":
            step = torch.compile(full_step, mode="reduce-overhead", dynamic=False)  # CUDA graphs
        else:
            step = torch.compile(full_step, dynamic=False, options={"cpp_wrapper": True})
        rows = self.cache.k[0].shape[0]
        with torch.inference_mode():  # as the scheduler thread calls it: another grad mode would recompile
            zeros = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
            # two tensors, as in use (one passed twice would be guarded as aliased); the step writes position 0
            # of every free slot, which a prefill overwrites
            step(zeros, zeros.clone())
        return step

    def _decode_step(self) -> None:
        active = [i for i, s in enumerate(self.slots) if s is not None]
        hi = min(self.cache.k[0].shape[0], -(-(active[-1] + 1) // ROW_MULTIPLE) * ROW_MULTIPLE)
        if self._compiled_step is not None:
            hi = self.cache.k[0].shape[0]  # the compiled step's one shape: every slot
        tokens = [self.tokenizer.pad_id] * hi
        positions = [0] * hi  # idle rows write position 0 of their free slot, which prefill overwrites
        for i in active:
            run = self.slots[i]
            assert run is not None  # active
            tokens[i], positions[i] = run.last_token, run.position
        tok = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]
        if self._compiled_step is not None:
            logits = self._compiled_step(tok, pos)
        else:
            span = attention_span(max(positions) + 1, self.context)
            mask = (self.cols[None, :span] <= pos)[:, None, None, :]  # (hi, 1, 1, span): this token and before
            self.cache.bind(slice(0, hi), pos, span)
            logits = self.model(tok, position_ids=pos, attn_mask=mask, kv_cache=self.cache)[:, -1]
        greedy = logits.argmax(-1).tolist()  # every row's greedy token in one call, not one per slot
        for i in active:
            run = self.slots[i]
            assert run is not None
            run.position += 1
            self._advance(i, logits[i : i + 1], None, greedy[i])

    def _advance(self, slot: int, logits: torch.Tensor, prompt_lp: list[float | None] | None, greedy: int | None = None) -> None:
        """Sample the slot's next token from ``logits`` (1, vocab), tell its sink, free the slot when done.
        ``greedy``: the argmax of ``logits`` when the caller has it already."""
        run = self.slots[slot]
        assert run is not None  # only a running slot advances
        seq, s = run.seq, run.seq.settings
        if s.temperature == 0 and greedy is not None:
            token = greedy
        else:
            token = int(next_tokens(logits, s, run.generator)[0])
        logprob = top = None
        if seq.logprobs is not None:
            lp = torch.log_softmax(logits[0].float(), -1)
            logprob = float(lp[token])
            if seq.logprobs > 0:
                values, indices = lp.topk(seq.logprobs)
                top = list(zip(indices.tolist(), values.tolist()))
        run.n_generated += 1
        now = time.perf_counter()
        if run.n_generated == 1:
            run.first_token_at = now
            if self.on_first_token:
                self.on_first_token(now - seq.enqueued_at)
        finish = None
        if token in seq.stop_token_ids:
            finish = "stop"
        else:
            run.ids.append(token)
            text = self.tokenizer.decode(run.ids)
            cut = _first_stop(text, s.stop, len(run.text)) if s.stop else -1
            if cut >= 0:
                text, finish = text[:cut], "stop"
            run.text = text
        if finish is None and run.n_generated >= s.max_new_tokens:
            finish = "length"
        run.last_token = token
        if finish is not None:
            self.slots[slot] = None
            if self.on_finished and run.n_generated > 1:
                self.on_finished((now - run.first_token_at) / (run.n_generated - 1), run.n_generated)
        seq.sink(
            TokenEvent(
                token, logprob, top, run.text, run.n_generated, finish, prompt_lp, is_stop_token=token in seq.stop_token_ids
            )
        )


def attention_span(needed: int, context: int) -> int:
    """The cache positions a forward pass reads: ``needed`` rounded up to a multiple of
    ``SPAN_MULTIPLE`` (few distinct shapes), at most the context."""
    return min(context, -(-needed // SPAN_MULTIPLE) * SPAN_MULTIPLE)


def _first_stop(text: str, stops: list[str], seen: int) -> int:
    """The first position of any stop string in ``text``, searching only where a new match can be
    (``seen`` characters were already checked): stop strings match across token boundaries."""
    cuts = []
    for st in stops:
        i = text.find(st, max(0, seen - len(st) - 3))  # -3: a partial UTF-8 character may have resolved
        if i >= 0:
            cuts.append(i)
    return min(cuts) if cuts else -1


def random_seed() -> int:
    """A seed for a request that gave none: sampling stays reproducible only when the client sets one."""
    return secrets.randbits(63)
