"""Rows of fine-tuning examples: packing without cross-contamination, and the resumable row loader.

Each example contributes its inputs ``ids[:-1]`` and targets ``ids[1:]`` (ignored where not
trained) to a row of fixed length. With packing, several examples share a row: positions restart
at 0 for each, and a block-diagonal causal mask keeps each example from attending to the others,
so a packed row computes exactly what the examples would alone. Without packing, one example per
row, padded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from codex_ml.data.labels import IGNORE_INDEX
from codex_ml.data.loader import global_position, resume_position, spread_sample
from codex_ml.data.sft import Example

PAD_SEGMENT = -1


@dataclass
class Rows:
    input_ids: np.ndarray  # (N, T) int32
    labels: np.ndarray  # (N, T) int32, IGNORE_INDEX where not trained
    position_ids: np.ndarray  # (N, T) int32, restarting at every example
    segments: np.ndarray  # (N, T) int32: the example's index within its row, -1 for padding

    def __len__(self) -> int:
        return len(self.input_ids)


def truncate(example: Example, max_tokens: int, side: str = "right") -> tuple[Example, bool]:
    if len(example.ids) <= max_tokens:
        return example, False
    keep = slice(0, max_tokens) if side == "right" else slice(len(example.ids) - max_tokens, None)
    return Example(example.id, example.ids[keep], example.trained[keep]), True


def pack_examples(examples: list[Example], seq_len: int, pad_id: int, pack: bool) -> Rows:
    """Rows of ``seq_len`` positions; first-fit decreasing when packing (deterministic)."""
    items = [e for e in examples if len(e.ids) >= 2]
    if pack:
        order = sorted(range(len(items)), key=lambda i: (-len(items[i].ids), i))
        rows: list[list[int]] = []
        space: list[int] = []
        for i in order:
            need = len(items[i].ids) - 1
            slot = next((r for r, free in enumerate(space) if free >= need), None)
            if slot is None:
                rows.append([])
                space.append(seq_len)
                slot = len(rows) - 1
            rows[slot].append(i)
            space[slot] -= need
    else:
        rows = [[i] for i in range(len(items))]
    n = len(rows)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    positions = np.zeros((n, seq_len), dtype=np.int32)
    segments = np.full((n, seq_len), PAD_SEGMENT, dtype=np.int32)
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members):
            e = items[i]
            length = len(e.ids) - 1
            input_ids[r, at : at + length] = e.ids[:-1]
            target = np.asarray(e.ids[1:], dtype=np.int32)
            trained = np.asarray(e.trained[1:], dtype=bool)
            labels[r, at : at + length] = np.where(trained, target, IGNORE_INDEX)
            positions[r, at : at + length] = np.arange(length)
            segments[r, at : at + length] = seg
            at += length
    return Rows(input_ids, labels, positions, segments)


def row_batch(rows: Rows, index: np.ndarray, native: bool, flex: bool = False) -> dict[str, torch.Tensor]:
    """A batch of rows: the native model gets positions and a block-diagonal causal mask (or, with
    ``flex``, the example ids, from which the model builds a block-sparse FlexAttention mask on its
    device); a Hugging Face module gets a padding mask (its rows hold one example each)."""
    seg = torch.from_numpy(rows.segments[index]).long()
    batch = {
        "input_ids": torch.from_numpy(rows.input_ids[index]).long(),
        "labels": torch.from_numpy(rows.labels[index]).long(),
    }
    if native and flex:
        batch["position_ids"] = torch.from_numpy(rows.position_ids[index]).long()
        batch["segments"] = seg
    elif native:
        T = seg.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
        # a padding position attends to itself only, so no attention row is empty (NaN in softmax)
        mask = (same & causal) | torch.eye(T, dtype=torch.bool)
        batch["position_ids"] = torch.from_numpy(rows.position_ids[index]).long()
        batch["attn_mask"] = mask[:, None]
    else:
        batch["attention_mask"] = (seg >= 0).long()
    return batch


class RowBatches:
    """Shuffled batches of rows, a new order each epoch, with the same exact-resume state as the token loader."""

    def __init__(
        self, rows: Rows, batch_size: int, seed: int, native: bool, rank: int = 0, world_size: int = 1, flex: bool = False
    ) -> None:
        self.rows, self.batch_size, self.seed, self.native, self.flex = rows, batch_size, seed, native, flex
        self.rank, self.world_size = rank, world_size
        self.num_windows = len(rows)
        self.batches_per_epoch = len(rows) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training split has {len(rows)} rows: not one batch of {batch_size} per rank "
                f"({world_size} ranks); lower training.batch_size or add examples"
            )
        self.epoch, self.batch_index = 0, 0
        self._order: np.ndarray | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._order is None:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))
            mine = perm[self.rank :: self.world_size][: self.batches_per_epoch * self.batch_size]
            self._order = mine.reshape(self.batches_per_epoch, self.batch_size)
        index = self._order[self.batch_index]
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index, self._order = self.epoch + 1, 0, None
        return row_batch(self.rows, index, self.native, self.flex)

    def state_dict(self) -> dict:
        return {
            **global_position(self.epoch, self.batch_index, self.batch_size, self.world_size),
            "seed": self.seed,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_windows"] != self.num_windows or state["seed"] != self.seed:
            raise ValueError("the checkpoint's data position is for other data: the examples or data.seq_len changed")
        self.epoch, self.batch_index = resume_position(state, self.batch_size, self.world_size, self.batches_per_epoch)
        self._order = None


def eval_row_batches(
    rows: Rows,
    batch_size: int,
    native: bool,
    max_batches: int = 0,
    flex: bool = False,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> Iterator[dict]:
    """Validation batches of rows, the same every time; the rank's share of them (ranks never overlap).

    ``max_batches`` 0 covers every row; otherwise ``max_batches`` batches per rank of rows sampled
    by :func:`spread_sample` from all of them (rows are packed longest first, so the first rows
    alone would be the longest examples).
    """
    sample = spread_sample(len(rows), max_batches * batch_size * world_size, seed) if max_batches else np.arange(len(rows))
    mine = sample[rank::world_size]
    for start in range(0, len(mine), batch_size):
        yield row_batch(rows, mine[start : start + batch_size], native, flex)
