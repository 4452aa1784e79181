"""The resumable, deterministic batch loader over packed token shards.

Training rows are windows of ``seq_len + 1`` tokens at multiples of ``seq_len`` in the token
stream, visited in an order fixed by (seed, epoch). Each rank takes every ``world_size``-th window
of that order, so ranks never overlap. The loader's position (epoch, batch) is its whole state:
saving it in a checkpoint and loading it back resumes at exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

IGNORE_INDEX = -100


class TokenStream:
    """Several shards read as one array of tokens."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = [s for s in shards if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - int(self.starts[i])
        if local + (stop - start) <= len(self.shards[i]):
            return self.shards[i][local:local + stop - start]
        parts, pos = [], start
        while pos < stop:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            local = pos - int(self.starts[i])
            take = min(stop - pos, len(self.shards[i]) - local)
            parts.append(self.shards[i][local:local + take])
            pos += take
        return np.concatenate(parts)


def window_batch(stream: TokenStream, starts: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
    rows = np.stack([stream.slice(int(s), int(s) + seq_len + 1) for s in starts]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


class PackedBatches:
    """Shuffled training batches of packed windows; an endless iterator with exact resume."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> None:
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.pin_memory = pin_memory  # page-locked batches: the copy to the GPU runs asynchronously
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_windows = max(0, (len(stream) - 1) // seq_len)
        self.batches_per_epoch = self.num_windows // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training split has {len(stream)} tokens: not one batch of {batch_size} x {seq_len + 1} "
                f"tokens per rank ({world_size} ranks); lower training.batch_size or data.seq_len, or add data"
            )
        self.epoch, self.batch_index = 0, 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            mine = perm[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]
            self._order = mine.reshape(self.batches_per_epoch, self.batch_size)
        return self._order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        windows = self._epoch_order()[self.batch_index]
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index, self._order = self.epoch + 1, 0, None
        batch = window_batch(self.stream, windows * self.seq_len, self.seq_len)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "num_windows": self.num_windows, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["num_windows"] != self.num_windows or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data position is for {state['num_windows']} windows with seed {state['seed']}, "
                f"this data has {self.num_windows} with seed {self.seed}: the data or data.seq_len changed"
            )
        if state["world_size"] != self.world_size:
            raise ValueError(f"the checkpoint was written by {state['world_size']} ranks, this run has {self.world_size}")
        self.epoch, self.batch_index, self._order = state["epoch"], state["batch_index"], None


def eval_batches(stream: TokenStream, seq_len: int, batch_size: int, max_batches: int = 0,
                 rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Validation batches in stream order, the same every time; the rank's share of them.

    ``max_batches`` (0: all) bounds the work. A split shorter than one window gives one short row.
    """
    n = max(0, (len(stream) - 1) // seq_len)
    if n == 0:
        if len(stream) >= 2 and rank == 0:
            yield window_batch(stream, np.zeros(1, dtype=np.int64), len(stream) - 1)
        return
    starts = np.arange(n) * seq_len
    if max_batches:
        starts = starts[: max_batches * batch_size * world_size]
    starts = starts[rank::world_size]
    for i in range(0, len(starts), batch_size):
        yield window_batch(stream, starts[i:i + batch_size], seq_len)
