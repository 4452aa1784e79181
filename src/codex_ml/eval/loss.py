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
) -> dict:
    """Loss averaged over every target token (not over batches), its perplexity, and accuracy.

    ``all_reduce`` sums the totals across ranks when evaluation is sharded.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, tokens, correct
    for batch in batches:
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
