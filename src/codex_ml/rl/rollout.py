"""GRPO's rollouts: groups of completions sampled with the KV-cache decoder, scored, turned into training batches.

:class:`RolloutBatches` is the loop's batch iterator for GRPO. Each draw of a generation batch samples
``group_size`` completions of each of its prompts, scores them (``rl/scoring.py``), normalises the
rewards within each group into advantages, and keeps the old policy's and the reference's per-token
log-probabilities with the batch. A generation batch (``grad_accum`` micro-batches) serves
``iterations`` optimizer steps. Its state (which problems were drawn, how many generations were
sampled, the batch being reused) is explicit, so a resumed run samples exactly what an
uninterrupted one would: every random stream is derived from the seed and those counters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from codex_ml.data.problems import Problem
from codex_ml.eval.generate import SamplingSettings, generate
from codex_ml.models.gpt import GPT
from codex_ml.plugins import call_metric
from codex_ml.rl.scoring import RewardScorer, group_advantages
from codex_ml.tokenizer.core import CodeTokenizer

LogProbs = Callable[[torch.nn.Module, dict], torch.Tensor]  # (model, batch) -> (B, C) log-probs of the completion tokens


@dataclass
class RolloutSettings:
    group_size: int
    batch_size: int  # completions per micro-batch (per rank)
    grad_accum: int  # micro-batches per optimizer step: one generation batch
    iterations: int  # optimizer steps per generation batch
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    scale_rewards: str
    mask_truncated: bool
    seed: int
    rank: int = 0
    world_size: int = 1


class StepStats:
    """Sums and counts of a step's figures, added by the rollouts and the loss, drained by the loop after each step."""

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}

    def add(self, name: str, total: float, count: float) -> None:
        entry = self._sums.setdefault(name, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(count)

    def add_all(self, stats: dict[str, list[float]]) -> None:
        for name, (total, count) in stats.items():
            self.add(name, total, count)

    def drain(self) -> dict[str, torch.Tensor]:
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in self._sums.items()}
        self._sums = {}
        return out


def attention_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T): causal, hiding padding; a padded query sees itself, so no row of the mask is empty."""
    T = key_valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=key_valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=key_valid.device)
    return ((causal[None] & key_valid[:, None, :]) | eye[None])[:, None]


def completion_logps(model: torch.nn.Module, batch: dict, temperature: float) -> torch.Tensor:
    """Per-token log-probabilities (B, C) of the completion tokens under ``model``, at the sampling temperature."""
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], attn_mask=attention_mask(batch["key_valid"]))
    start, ids = batch["prompt_len"] - 1, batch["completion_ids"]
    logits = logits[:, start : start + ids.shape[1]].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def pack_rollout(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_id: int) -> dict:
    """Prompts left-padded to a common length P, completions right-padded after them: completion tokens sit in
    columns P.. of every row. Positions count real tokens only, as the decoder's left-padded generation does."""
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completion_ids))
    B = len(prompt_ids)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    key_valid = torch.zeros((B, P + C), dtype=torch.bool)
    completions = torch.full((B, C), pad_id, dtype=torch.long)
    mask = torch.zeros((B, C))
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, P - len(p) : P] = torch.tensor(p)
        key_valid[i, P - len(p) : P + len(c)] = True
        if c:
            input_ids[i, P : P + len(c)] = torch.tensor(c)
            completions[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1.0
    positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "position_ids": positions,
        "key_valid": key_valid,
        "completion_ids": completions,
        "completion_mask": mask,
        "prompt_len": P,
    }


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams for each (seed, rank, counter)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class RolloutBatches:
    """GRPO's training batches, generated from the current policy as the loop asks for them."""

    def __init__(
        self,
        problems: list[Problem],
        tokenizer: CodeTokenizer,
        policy: GPT,
        scorer: RewardScorer,
        s: RolloutSettings,
        logps: LogProbs,
        device: torch.device,
        stats: StepStats,
        reference: GPT | None = None,
        metrics: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.problems, self.tokenizer, self.policy, self.scorer, self.s = problems, tokenizer, policy, scorer, s
        self.logps, self.device, self.stats, self.reference = logps, device, stats, reference
        self.metrics = metrics or {}
        self.prompt_ids = [tokenizer.encode(p.prompt) or [tokenizer.eos_id] for p in problems]
        self.position = 0  # problems drawn so far, by all ranks together
        self.generations = 0  # generation calls made by this rank
        self.buffer: list[dict] = []  # the generation batch being trained on: micro-batches and their figures
        self.index = 0  # next micro-batch of the buffer
        self.passes = 0  # completed passes over the buffer
        self._order_epoch, self._order = -1, np.arange(0)

    def __iter__(self) -> RolloutBatches:
        return self

    def __next__(self) -> dict:
        if not self.buffer:
            self.buffer = [self._rollout() for _ in range(self.s.grad_accum)]
            self.index = self.passes = 0
        entry = self.buffer[self.index]
        self.stats.add_all(entry["stats"])
        self.index += 1
        if self.index == len(self.buffer):
            self.index, self.passes = 0, self.passes + 1
            if self.passes == self.s.iterations:
                self.buffer = []
        return dict(entry["batch"])

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "generations": self.generations,
            "index": self.index,
            "passes": self.passes,
            "buffer": [{"batch": e["batch"], "stats": e["stats"]} for e in self.buffer],
        }

    def load_state_dict(self, state: dict) -> None:
        self.position, self.generations = int(state["position"]), int(state["generations"])
        self.index, self.passes = int(state["index"]), int(state["passes"])
        self.buffer = list(state["buffer"])

    # ---------------------------------------------------------------- one micro-batch

    def _draw(self) -> list[int]:
        """This rank's prompts for one micro-batch: a fresh seeded permutation of the problems every epoch."""
        k = self.s.batch_size // self.s.group_size
        start = self.position + k * self.s.rank
        picked = [self._problem_at(i) for i in range(start, start + k)]
        self.position += k * self.s.world_size
        return picked

    def _problem_at(self, i: int) -> int:
        epoch, j = divmod(i, len(self.problems))
        if epoch != self._order_epoch:
            self._order = np.random.default_rng(derived_seed(self.s.seed, epoch)).permutation(len(self.problems))
            self._order_epoch = epoch
        return int(self._order[j])

    @torch.no_grad()
    def _rollout(self) -> dict:
        s, G = self.s, self.s.group_size
        chosen = self._draw()
        problems = [self.problems[i] for i in chosen]
        seed = derived_seed(s.seed, s.rank, self.generations)
        self.generations += 1
        sampling = SamplingSettings(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, n=G, seed=seed, stop=s.stop
        )
        groups = generate(self.policy, self.tokenizer, [self.prompt_ids[i] for i in chosen], sampling)
        completions = [c for group in groups for c in group]
        eos = self.tokenizer.eos_id
        # what the policy produced and is trained on: an end-of-text is part of it (stopping is learnt too)
        train_ids = [c.token_ids + ([eos] if c.finish_reason == "eos" else []) for c in completions]
        truncated = torch.tensor([c.finish_reason == "length" for c in completions])
        prompts = [p.prompt for p in problems for _ in range(G)]
        texts = [c.text for c in completions]
        shared = set.intersection(*(set(p.columns()) for p in problems))
        columns: dict[str, list] = {k: [p.columns()[k] for p in problems for _ in range(G)] for k in sorted(shared)}
        columns["completion_ids"] = train_ids
        columns["max_completion_length"] = [s.max_new_tokens] * len(texts)
        scores = self.scorer(prompts, texts, columns)
        advantages, group_std = group_advantages(scores.total, scores.valid, G, s.scale_rewards)

        batch = pack_rollout([self.prompt_ids[i] for i in chosen for _ in range(G)], train_ids, self.tokenizer.pad_id)
        keep = scores.valid & ~truncated if s.mask_truncated else scores.valid
        batch["completion_mask"] = batch["completion_mask"] * keep[:, None]
        batch["advantages"] = advantages.float()
        batch["valid"] = scores.valid
        if s.iterations > 1 or self.reference is not None:
            on_device = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if s.iterations > 1:  # the policy that sampled: the importance ratio's denominator for every reuse
                batch["old_logps"] = self._eval_logps(self.policy, on_device).cpu()
            if self.reference is not None:
                batch["ref_logps"] = self._eval_logps(self.reference, on_device).cpu()
        return {"batch": batch, "stats": self._figures(scores, group_std, train_ids, truncated, prompts, texts, columns)}

    def _eval_logps(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return self.logps(model, batch)
        finally:
            model.train(was_training)

    def _figures(
        self,
        scores: Any,
        group_std: torch.Tensor,
        train_ids: list[list[int]],
        truncated: torch.Tensor,
        prompts: list[str],
        texts: list[str],
        columns: dict,
    ) -> dict[str, list[float]]:
        """TRL's names: reward, reward_std (mean std of a group), frac_reward_zero_std, rewards/<name>/mean|std,
        completions/mean_length, completions/clipped_ratio; plus excluded completions and ``grpo.metrics``."""
        n = len(texts)
        valid = scores.valid
        finite = group_std[torch.isfinite(group_std)]
        out = {
            "reward": [float(scores.total[valid].sum()), float(valid.sum())],
            "reward_std": [float(finite.sum()), float(finite.numel())],
            "frac_reward_zero_std": [float((finite < 1e-8).sum()), float(finite.numel())],
            "completions/mean_length": [float(sum(len(t) for t in train_ids)), float(n)],
            "completions/clipped_ratio": [float(truncated.sum()), float(n)],
            "completions/excluded_ratio": [float((~valid).sum()), float(n)],
        }
        for name, values in scores.per_reward.items():
            judged = [v for v in values if v is not None]
            out[f"rewards/{name}/mean"] = [float(sum(judged)), float(len(judged))]
            if len(judged) >= 2:
                out[f"rewards/{name}/std"] = [float(np.std(judged, ddof=1)), 1.0]
        rewards = [float(r) if ok else None for r, ok in zip(scores.total.tolist(), valid.tolist())]
        for name, fn in self.metrics.items():
            out[f"metrics/{name}"] = [call_metric(fn, name, prompts, texts, {**columns, "rewards": rewards}), 1.0]
        return out
