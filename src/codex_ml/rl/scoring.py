"""Scoring a batch of completions: each named reward, their weighted sum, and group-relative advantages."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from codex_ml.conf.schema import SCALE_REWARDS
from codex_ml.plugins import PluginError

STD_EPS = 1e-4  # TRL's: a group whose rewards all agree gets advantages of 0, not a division by 0


@dataclass
class Scores:
    """Per completion: the combined reward (nan where excluded), whether it counts, and each reward's own value."""

    total: torch.Tensor  # (B,) float64
    valid: torch.Tensor  # (B,) bool: every reward judged it (a sandbox breakdown leaves it out)
    per_reward: dict[str, list[float | None]]


class RewardScorer:
    """Calls each reward function with TRL's convention and combines them with ``weights``."""

    def __init__(self, functions: dict[str, Callable[..., Any]], weights: Sequence[float]) -> None:
        if weights and len(weights) != len(functions):
            raise PluginError(
                f"grpo.reward_weights: {len(weights)} weights for {len(functions)} rewards ({', '.join(functions)})"
            )
        self.functions = functions
        self.weights = list(weights) or [1.0] * len(functions)

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> Scores:
        per_reward: dict[str, list[float | None]] = {}
        for name, fn in self.functions.items():
            values = fn(prompts=prompts, completions=completions, **columns)
            per_reward[name] = _checked(name, values, len(completions))
        total: list[float] = []
        valid: list[bool] = []
        for i in range(len(completions)):
            judged = [v for v in (per_reward[name][i] for name in self.functions) if v is not None]
            ok = len(judged) == len(self.functions)  # a reward that could not judge it leaves it out
            valid.append(ok)
            total.append(sum(w * v for w, v in zip(self.weights, judged)) if ok else math.nan)
        return Scores(torch.tensor(total, dtype=torch.float64), torch.tensor(valid), per_reward)


def _checked(name: str, values: Any, n: int) -> list[float | None]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise PluginError(f"reward {name!r} returned {got} for {n} completions (it must return one float per completion)")
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise PluginError(f"reward {name!r} returned {v!r}: each reward must be a finite number, or None to leave it out")
        else:
            out.append(float(v))
    return out


def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, group_size: int, scale: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages ``r - mean(group)`` (divided by the std of the group or batch unless ``scale='none'``),
    over the valid completions only; 0 for the others. Also each group's std (nan for a group with fewer than 2).

    Stds are unbiased (TRL's); ``rewards`` (B,) in groups of ``group_size`` consecutive completions.
    """
    r = torch.where(valid, rewards, torch.zeros_like(rewards)).view(-1, group_size)
    v = valid.view(-1, group_size).to(rewards.dtype)
    n = v.sum(-1, keepdim=True)
    mean = (r * v).sum(-1, keepdim=True) / n.clamp(min=1)
    centred = (r - mean) * v
    std = ((centred**2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    std = torch.where(n >= 2, std, torch.full_like(std, math.nan))
    advantages = centred
    if scale == "group":
        advantages = centred / (torch.nan_to_num(std, nan=0.0) + STD_EPS)
    elif scale == "batch":
        flat = rewards[valid]
        batch_std = flat.std() if flat.numel() >= 2 else torch.zeros((), dtype=rewards.dtype)
        advantages = centred / (batch_std + STD_EPS)
    elif scale != "none":
        raise ValueError(f"grpo.scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {scale!r}")
    return (advantages * v).view(-1), std.view(-1)
