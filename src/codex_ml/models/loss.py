"""The token losses every engine trains on: the ignore index, the summed cross-entropy, the fused one.

One place for these, so the label convention and the reduction (a *sum* over target tokens,
normalised by the caller by the target tokens of the whole step on every rank) cannot drift
between the native loop, the Hugging Face Trainer engine and evaluation.

``linear_cross_entropy`` fuses the output projection with the loss, computed in chunks of tokens.
The usual path materialises logits for every token (tokens x vocab floats), then log-softmax,
then in backward a tensor of the same size again. Here each chunk's logits live only long
enough to give the loss and, right away, the gradients of the hidden states and of the output
weight (softmax minus one-hot). Same FLOPs, a fraction of the memory, and no separate
log-softmax backward: measurably faster on CPU, where that pass is memory bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from codex_ml.conf.schema import DPO_LOSS_TYPES, GRPO_LOSS_TYPES  # the names dpo.loss_type and grpo.loss_type allow
from codex_ml.data.labels import IGNORE_INDEX  # re-exported: the losses' callers import it from here


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of ``labels`` are trained on (a 0-d tensor on the labels' device)."""
    return (labels != IGNORE_INDEX).sum()


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over target tokens (labels != IGNORE_INDEX), in fp32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels`` (IGNORE_INDEX ignored), in fp32.

    hidden: (..., D); weight: (V, D); labels: (...). Equals ``summed_token_loss(hidden @ weight.T,
    labels)`` up to floating-point rounding. ``chunk`` is how many tokens' logits exist at once.
    """
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk)


class SummedLossModule(torch.nn.Module):
    """A model and its loss as one module: ``forward(batch)`` is the batch's summed token loss.

    Data parallelism wraps *this* (not the bare model), so that every forward pass, the fused
    loss's backbone call included, goes through ``DistributedDataParallel.__call__``: only then is
    the reducer prepared and are gradients averaged across ranks. The Hugging Face Trainer calls
    it the same way.
    """

    def __init__(self, model: torch.nn.Module, loss_sum: Callable[[dict], torch.Tensor]) -> None:
        super().__init__()
        self.model = model  # registered, so DDP sees (and synchronises) the model's parameters
        self.loss_sum = loss_sum

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_sum(batch)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        compute_dtype = hidden.dtype
        w = weight.to(compute_dtype)
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            y = labels[start : start + chunk]
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, torch.zeros_like(y))
            logits = (h @ w.t()).float()
            picked = logits.gather(1, target[:, None]).squeeze(1)
            # softmax in place: one exp pass serves both the loss and the gradient
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1)
            lse = top.squeeze(1) + total.log()
            loss += ((lse - picked) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of losses)/d(logits) = softmax - onehot, zero on ignored tokens
            probs.mul_((valid / total)[:, None])
            probs[torch.arange(len(target), device=probs.device), target] -= valid.to(probs.dtype)
            probs = probs.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = probs @ w
            if grad_weight is not None:
                grad_weight.addmm_(probs.t().float() if compute_dtype != torch.float32 else probs.t(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None


# ---------------------------------------------------------------- preference objectives (reward model, DPO)
#
# Pairs come as rows [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]. Each function returns
# one value per pair, unreduced: the recipe sums them, and the loop divides by the pairs of the whole
# step (all micro-batches and ranks), so gradient accumulation leaves the objective unchanged.


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's target tokens, how many there are), in fp32.

    ``labels`` are aligned with the inputs, as Hugging Face's are: ``labels[:, t]`` is the token at
    position t (IGNORE_INDEX where not scored), predicted by ``logits[:, t - 1]``.
    """
    targets = labels[:, 1:]
    flat = logits[:, :-1].float().reshape(-1, logits.size(-1))
    token_logps = -F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    token_logps = token_logps.view(targets.shape)
    return token_logps.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def pairwise_reward_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0, center_coefficient: float = 0.0
) -> torch.Tensor:
    """Bradley-Terry loss per pair: ``-log sigmoid(r_chosen - r_rejected - margin)``, plus
    ``center_coefficient * (r_chosen + r_rejected)^2`` (TRL's ``center_rewards_coefficient``, which keeps
    the rewards centred on zero: the pairwise term alone fixes only their differences)."""
    loss = -F.logsigmoid(chosen.float() - rejected.float() - margin)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen.float() + rejected.float()) ** 2
    return loss


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards), the rewards ``beta * (logp - ref_logp)`` as TRL logs them.

    ``sigmoid`` is DPO's ``-log sigmoid(beta * (chosen log-ratio - rejected log-ratio))``: ln 2 while
    the policy equals the reference. ``ipo`` is IPO's ``(delta - 1 / (2 beta))^2`` with the log-ratios
    averaged over each completion's tokens (``chosen_tokens``/``rejected_tokens``), as TRL computes it.
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss averages over completion tokens: pass chosen_tokens and rejected_tokens")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; allowed: {', '.join(DPO_LOSS_TYPES)}")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ------------------------------------------------------------------ GRPO: clipped policy gradient with a k3 KL penalty


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) at tokens sampled from the policy (Schulman's
    estimator): ``exp(ref - logp) - (ref - logp) - 1``; unbiased, never negative, 0 where they agree."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's per-token loss and importance ratio: ``-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)
    + beta * k3_kl`` with ``r = exp(logp - old_logp)``; (B, C) each. ``advantages``: (B,), one per completion.

    ``epsilon_high > epsilon`` is DAPO's asymmetric clipping (room for unlikely tokens to grow).
    """
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    loss = -torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon_high) * a)
    if beta:
        if ref_logps is None:
            raise ValueError("grpo_token_loss: beta > 0 needs the reference model's log-probabilities")
        loss = loss + beta * k3_kl(logps, ref_logps)
    return loss, ratio


def grpo_loss_sum(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """The batch's GRPO loss *summed over its units* (``grpo_units``); the caller divides by the step's units.

    ``grpo``: each completion's masked mean over its tokens, summed over completions (units: completions);
    ``dr_grpo``: masked token sum over the constant ``max_new_tokens``, so no length bias (units: completions);
    ``dapo``: masked token sum (units: tokens, so the step's loss is the token-level mean over the whole batch).
    """
    masked = token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    if loss_type == "dr_grpo":
        return masked.sum() / max_new_tokens
    if loss_type == "dapo":
        return masked.sum()
    raise ValueError(f"unknown GRPO loss type {loss_type!r}; allowed: {', '.join(GRPO_LOSS_TYPES)}")


def grpo_units(mask: torch.Tensor, valid: torch.Tensor, loss_type: str) -> torch.Tensor:
    """What ``grpo_loss_sum`` is summed over: the batch's valid completions, or (dapo) its trained tokens."""
    return mask.sum() if loss_type == "dapo" else valid.sum()
