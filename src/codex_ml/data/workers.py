"""Mapping a function over batches in worker processes, in order, with a bounded number of batches in flight.

``multiprocessing.Pool.imap`` reads its whole input ahead into the task queue, so a corpus larger than
memory would be held there; here at most ``2 * num_workers`` batches are submitted and not yet consumed.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

_B = TypeVar("_B")
_R = TypeVar("_R")


def ordered_map(
    fn: Callable[[_B], _R],
    batches: Iterable[_B],
    num_workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...] = (),
    in_flight: int = 2,
) -> Iterator[_R]:
    """``fn(batch)`` for each batch, in input order; ``num_workers`` spawned processes (0: this one, after
    ``initializer(*initargs)``), each batch submitted only while fewer than ``in_flight * num_workers`` wait."""
    if num_workers == 0:
        initializer(*initargs)
        for batch in batches:
            yield fn(batch)
        return
    # spawn: forking a process that holds torch's and tokenizers' thread pools is unsafe
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(fn, (batch,)))
            if len(pending) >= in_flight * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
