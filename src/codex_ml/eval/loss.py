"""Token-weighted loss, perplexity and next-token accuracy."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch

from codex_ml.models.loss import IGNORE_INDEX, summed_token_loss


@torch.no_grad()
def evaluate_loss(
    forward: Callable[[dict], torch.Tensor],
    batches: Iterable[dict],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lockstep: bool = False,
) -> dict:
    """Loss averaged over every target token (not over batches), its perplexity, and accuracy.

    ``all_reduce`` sums the totals across ranks when evaluation is sharded. ``lockstep``: every
    forward is a collective (a sharded model gathers its parameters), so ranks with fewer batches
    than another run a batch of no target token until every rank is done (it adds nothing).
    """
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, tokens, correct
    if lockstep and all_reduce is None:
        raise ValueError("evaluate_loss: lockstep needs all_reduce (the ranks agree on when to stop)")
    remaining = iter(batches)
    while True:
        batch = next(remaining, None)
        if lockstep:
            assert all_reduce is not None
            busy = all_reduce(torch.tensor([float(batch is not None)], dtype=torch.float64, device=device))
            if busy.item() == 0:
                break
            batch = batch if batch is not None else _idle_batch()
        elif batch is None:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            logits = forward(batch)
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        totals[0] += summed_token_loss(logits, labels).double()
        totals[1] += mask.sum()
        totals[2] += ((logits.argmax(-1) == labels) & mask).sum()
    if all_reduce is not None:
        totals = all_reduce(totals)
    loss_sum, tokens, correct = totals.tolist()
    if tokens == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "accuracy": float("nan"), "tokens": 0}
    loss = loss_sum / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "accuracy": correct / tokens, "tokens": int(tokens)}


def _idle_batch() -> dict[str, torch.Tensor]:
    """One token whose label is ignored: a forward that keeps a rank in step and counts for nothing."""
    return {"input_ids": torch.zeros((1, 1), dtype=torch.long), "labels": torch.full((1, 1), IGNORE_INDEX)}
