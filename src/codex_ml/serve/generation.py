"""Between the HTTP handlers and the scheduler: a served model, and one request's choices in flight.

``ServedModel`` holds what requests are checked against (the model id, its context, the tokenizer)
and the scheduler. ``Choices`` submits a request's sequences and hands their token events to the
event loop; closing it (a finished response, a client gone, an error) cancels whatever still runs,
so a slot never outlives its client.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from codex_ml.eval.generate import SamplingSettings
from codex_ml.serve.chat import ChatFormatter
from codex_ml.serve.errors import ApiError
from codex_ml.serve.limits import check_context
from codex_ml.serve.scheduler import QueueFull, Scheduler, Sequence, TokenEvent, random_seed
from codex_ml.tokenizer.core import CodeTokenizer


@dataclass
class ChoiceSpec:
    """One sequence to generate: its prompt, and how."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stops: list[str]
    stop_token_ids: frozenset[int]
    logprobs: int | None
    prompt_logprobs: bool = False


class ServedModel:
    """The model behind the API: id, context, tokenizer, chat template and its scheduler."""

    def __init__(self, model_id: str, tokenizer: CodeTokenizer, tokenizer_dir: Path, scheduler: Scheduler) -> None:
        self.model_id, self.tokenizer, self.scheduler = model_id, tokenizer, scheduler
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
        self.context = scheduler.context
        self.vocab_size = min(len(tokenizer), scheduler.model.config.vocab_size)
        self.chat = ChatFormatter(tokenizer, tokenizer_dir)
        vocab = tokenizer.backend.get_vocab(with_added_tokens=False)
        # the longest token in UTF-8 bytes bounds how few tokens a text can be, before tokenizing it
        self.max_token_bytes = max((len(tokenizer.decode([i]).encode()) for i in vocab.values()), default=1) or 1
        self.max_token_bytes = max(self.max_token_bytes, max((len(t) for t in vocab), default=1))

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        """The one mailbox of ``loop`` (uvicorn runs one loop; tests may start servers on others)."""
        box = self._mailboxes.get(loop)
        if box is None:
            box = self._mailboxes[loop] = Mailbox(loop)
        return box

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise ApiError(
                404, f"the model {name[:100]!r} does not exist; this server serves {self.model_id!r}", "model_not_found"
            )

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """Token ids of ``text``; 400 before tokenizing when it cannot fit the context even at the most
        bytes per token."""
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        at_least = -(-n_bytes // self.max_token_bytes)
        if at_least + max_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt has at least {at_least} tokens and max_tokens is {max_tokens}: more than the "
                f"model's context of {self.context}",
                "context_length_exceeded",
            )
        return self.tokenizer.encode(text)

    def check_ids(self, ids: list[int]) -> None:
        bad = next((i for i in ids if i >= self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (size {self.vocab_size})", "invalid_token")

    def fit(self, ids: list[int], max_tokens: int) -> list[int]:
        ids = ids or [self.tokenizer.eos_id]  # an empty prompt starts after a document, as generate does
        check_context(len(ids), max_tokens, self.context)
        return ids


class Mailbox:
    """Token events from the scheduler thread to the event loop, one wake-up of the loop for all that
    arrived since the last, instead of one per token (each wake-up is a write to the loop's pipe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[tuple[asyncio.Queue, tuple[int, TokenEvent]]] = deque()
        self._lock = threading.Lock()
        self._wake_pending = False

    def post(self, queue: asyncio.Queue, item: tuple[int, TokenEvent]) -> None:
        """On the scheduler thread: ``item`` goes into ``queue`` on the loop's thread, in order."""
        with self._lock:
            self._items.append((queue, item))
            if self._wake_pending:
                return
            self._wake_pending = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._wake_pending = self._items, deque(), False
        for queue, item in items:
            queue.put_nowait(item)


class Choices:
    """A request's sequences in the scheduler; iterate ``events()`` for (choice index, TokenEvent)."""

    def __init__(self, served: ServedModel, specs: list[ChoiceSpec], request_id: str) -> None:
        self.served, self.loop = served, asyncio.get_running_loop()
        self.mailbox = served.mailbox(self.loop)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs = [self._sequence(i, s, request_id) for i, s in enumerate(specs)]
        self.finished = [s.max_tokens == 0 for s in specs]

    def _sequence(self, index: int, s: ChoiceSpec, request_id: str) -> Sequence:
        def sink(event: TokenEvent) -> None:  # on the scheduler thread
            self.mailbox.post(self.queue, (index, event))

        settings = SamplingSettings(
            max_new_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed, stop=list(s.stops)
        )
        return Sequence(s.prompt_ids, settings, sink, s.stop_token_ids, s.logprobs, s.prompt_logprobs, request_id)

    def submit(self) -> None:
        todo = [s for s, done in zip(self.seqs, self.finished) if not done]
        try:
            self.served.scheduler.submit(todo)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry shortly", "server_busy", {"Retry-After": "1"}) from None

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        while not all(self.finished):
            index, event = await self.queue.get()
            if event.finish == "error":
                raise RuntimeError("the scheduler failed")
            if event.finish is not None:
                self.finished[index] = True
            yield index, event

    def close(self) -> None:
        """Cancel what still runs (a client gone, an error); a no-op when all finished."""
        running = [s for s, done in zip(self.seqs, self.finished) if not done]
        if running:
            self.served.scheduler.cancel(running)


def choice_seed(seed: int | None, index: int) -> int:
    """Choice ``index`` samples with ``seed + index``: reproducible per request, different per choice."""
    return random_seed() if seed is None else (seed + index) % 2**64
