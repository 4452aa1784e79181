"""The resumable, deterministic batch loader over packed token shards.

Training rows are windows of ``seq_len + 1`` tokens at multiples of ``seq_len`` in the token
stream, visited in an order fixed by (seed, epoch). Each rank takes every ``world_size``-th window
of that order, so ranks never overlap. The loader's position (epoch, batch) is its whole state:
saving it in a checkpoint and loading it back resumes at exactly the next batch. Validation reads
the same windows in stream order: all of them, or a fixed sample spread over the whole split.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


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
            return self.shards[i][local : local + stop - start]
        parts, pos = [], start
        while pos < stop:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            local = pos - int(self.starts[i])
            take = min(stop - pos, len(self.shards[i]) - local)
            parts.append(self.shards[i][local : local + take])
            pos += take
        return np.concatenate(parts)


def window_batch(stream: TokenStream, starts: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
    rows = torch.from_numpy(np.stack([stream.slice(int(s), int(s) + seq_len + 1) for s in starts]).astype(np.int64))
    return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


class PackedBatches:
    """Shuffled training batches of packed windows; an endless iterator with exact resume."""

    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
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
            mine = perm[self.rank :: self.world_size][: self.batches_per_epoch * self.batch_size]
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
        return {
            **global_position(self.epoch, self.batch_index, self.batch_size, self.world_size),
            "seed": self.seed,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_windows"] != self.num_windows or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data position is for {state['num_windows']} windows with seed {state['seed']}, "
                f"this data has {self.num_windows} with seed {self.seed}: the data or data.seq_len changed"
            )
        self.epoch, self.batch_index = resume_position(state, self.batch_size, self.world_size, self.batches_per_epoch)
        self._order = None


def global_position(epoch: int, batch_index: int, batch_size: int, world_size: int) -> dict:
    """A loader's position in terms of the whole job: the epoch and the samples all ranks consumed in it.

    Rank ``r`` of ``W`` takes every ``W``-th item of the epoch's order, so after ``b`` batches of
    ``B`` the ranks together consumed exactly the first ``b * B * W`` items: the position any
    other world size (or batch size) continues from.
    """
    return {
        "epoch": epoch,
        "batch_index": batch_index,
        "samples": batch_index * batch_size * world_size,
        "batch_size": batch_size,
        "world_size": world_size,
    }


def resume_position(state: dict, batch_size: int, world_size: int, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batch index) of this loader that continue at the saved global sample.

    Refuses a position that the new global batch (``batch_size * world_size``) does not divide,
    since no batch index would continue there without skipping or repeating an item.
    """
    samples = state.get("samples", state["batch_index"] * state.get("batch_size", batch_size) * state["world_size"])
    global_batch = batch_size * world_size
    if samples % global_batch:
        raise ValueError(
            f"the checkpoint stopped after {samples} samples of epoch {state['epoch']} "
            f"({state['world_size']} ranks x batch {state.get('batch_size', '?')}); {world_size} ranks x batch "
            f"{batch_size} = {global_batch} per step cannot continue there exactly: choose a global batch that divides it"
        )
    index = samples // global_batch
    if index >= batches_per_epoch:
        raise ValueError(
            f"the checkpoint's position ({samples} samples) is past this loader's epoch of {batches_per_epoch} steps"
        )
    return state["epoch"], index


def spread_sample(n: int, k: int, seed: int = 0) -> np.ndarray:
    """``k`` of the indices ``0..n-1``, sorted: one drawn at random from each of ``k`` equal strata.

    Every part of the range contributes in proportion to its length, so an average over the
    sample is an unbiased estimate of the average over all ``n`` (up to the strata's rounding),
    with less variance than a plain random draw when neighbours resemble each other, as the
    windows of one document do. The same ``(n, k, seed)`` gives the same sample every time.
    """
    if k <= 0 or k >= n:
        return np.arange(n)
    bounds = (np.arange(k + 1) * n) // k  # strata of floor(n/k) or ceil(n/k) indices, none empty as k < n
    return np.random.default_rng([seed, n, k]).integers(bounds[:-1], bounds[1:])


def eval_batches(
    stream: TokenStream, seq_len: int, batch_size: int, max_batches: int = 0, rank: int = 0, world_size: int = 1, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Validation batches, the same every time; the rank's share of them (ranks never overlap).

    ``max_batches`` 0 (or at least the split's size) covers the whole split: every target token
    exactly once, the tokens after the last full window as one short row. Otherwise the work is
    bounded to ``max_batches`` batches per rank of windows sampled by :func:`spread_sample` from the
    whole stream, so the figure estimates the whole split's, not that of the documents that come first.
    """
    n = max(0, (len(stream) - 1) // seq_len)
    sample = spread_sample(n, max_batches * batch_size * world_size, seed) if max_batches else np.arange(n)
    mine = sample[rank::world_size] * seq_len
    for i in range(0, len(mine), batch_size):
        yield window_batch(stream, mine[i : i + batch_size], seq_len)
    tail = len(stream) - 1 - n * seq_len  # targets past the last full window (the whole split if it is short)
    if len(sample) == n and tail > 0 and n % world_size == rank:
        yield window_batch(stream, np.array([n * seq_len]), tail)
