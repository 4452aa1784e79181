"""Recipe: `codex-ml grpo`, Group Relative Policy Optimisation with rewards from executing completions.

GRPO is one more objective of the one training loop (``recipes/train.py``'s Task seam): its batches
are rollouts sampled from the policy with the KV-cache decoder and judged in the sandbox
(``rl/rollout.py``), its loss the clipped policy gradient with a k3 KL penalty (``models/loss.py``).
Run folder, checkpoints, exact resume, tracking, ``evaluate``, ``export`` and ``merge`` are training's.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from codex_ml import plugins
from codex_ml.conf.schema import ConfigError, GRPOCommandConfig, TrainConfig
from codex_ml.data.problems import Problem, problems_record, read_problems
from codex_ml.eval.generate import SamplingSettings, generate
from codex_ml.eval.sandbox import Sandbox
from codex_ml.models.loss import grpo_loss_sum, grpo_token_loss, grpo_units
from codex_ml.recipes.train import TaskContext, TaskParts, final_metric, sft_tokenizer, train
from codex_ml.rl.rewards import ExecutionReward
from codex_ml.rl.rollout import RolloutBatches, RolloutSettings, StepStats, completion_logps
from codex_ml.rl.scoring import RewardScorer
from codex_ml.runs import TOKENIZER_DIR
from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.training.distributed import Distributed


def grpo_command(cfg: GRPOCommandConfig) -> float:
    """Read and check the problems, then train; returns the final ``training.best_metric``."""
    from codex_ml.sweep import sweep_context

    problems = read_problems(list(cfg.data.paths))  # every record checked before any work
    eval_problems = read_problems(list(cfg.grpo.eval_paths)) if cfg.grpo.eval_paths else []
    task = GRPOTask(problems, eval_problems)
    job_dir, sweep = sweep_context()
    try:
        metrics = train(cfg, sweep_job_dir=job_dir, sweep=sweep, task=task)
    finally:
        task.close()
    return final_metric(metrics, cfg.training.best_metric)


class GRPOLoss(torch.nn.Module):
    """``forward(batch)``: the batch's GRPO loss summed over its units; the step's clip and KL figures go to ``stats``."""

    def __init__(self, model: torch.nn.Module, cfg: GRPOCommandConfig, stats: StepStats) -> None:
        super().__init__()
        self.model = model  # registered, so DDP synchronises its parameters
        g = cfg.grpo
        self.loss_type, self.max_new_tokens, self.temperature, self.beta = g.loss_type, g.max_new_tokens, g.temperature, g.beta
        self.epsilon = g.epsilon
        self.epsilon_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
        self.stats = stats

    def forward(self, batch: dict) -> torch.Tensor:
        logps = completion_logps(self.model, batch, self.temperature)
        # one update per generation: the sampling policy is this one, so the ratio is 1 and only its gradient counts
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        ref = batch.get("ref_logps")
        token_loss, ratio = grpo_token_loss(logps, old, batch["advantages"], self.epsilon, self.epsilon_high, self.beta, ref)
        mask = batch["completion_mask"]
        self._record(logps.detach(), ratio.detach(), ref, batch["advantages"], mask)
        return grpo_loss_sum(token_loss, mask, self.loss_type, self.max_new_tokens)

    @torch.no_grad()
    def _record(
        self, logps: torch.Tensor, ratio: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor, mask: torch.Tensor
    ) -> None:
        # read back now: a GRPO step synchronises with the host anyway (sampling, judging), so this costs nothing
        tokens = float(mask.sum())
        a = adv[:, None]
        low = ((ratio < 1 - self.epsilon) & (a < 0)).float() * mask
        high = ((ratio > 1 + self.epsilon_high) & (a > 0)).float() * mask
        region = float((low + high).sum())
        self.stats.add("clip_ratio", region, tokens)
        self.stats.add("clip_ratio/low_mean", float(low.sum()), tokens)
        self.stats.add("clip_ratio/high_mean", float(high.sum()), tokens)
        self.stats.add("clip_ratio/region_mean", region, tokens)
        if ref is not None:
            delta = ref - logps
            self.stats.add("kl", float(((torch.exp(delta) - delta - 1) * mask).sum()), tokens)


class GRPOTask:
    """The GRPO objective for ``train(cfg, task=...)``."""

    name = "grpo"
    hf_engine = False  # sampling needs the native decoder's KV cache inside the native loop

    def __init__(self, problems: list[Problem], eval_problems: list[Problem] | None = None) -> None:
        self.problems, self.eval_problems = problems, eval_problems or []
        self.sandbox: Sandbox | None = None

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    def prepare(self, cfg: TrainConfig, run_dir: Path, dist: Distributed) -> tuple[CodeTokenizer, Any]:
        tokenizer = sft_tokenizer(cfg, run_dir) if dist.is_main else None
        dist.barrier()
        return tokenizer or CodeTokenizer.load(run_dir / TOKENIZER_DIR), self.problems

    def parts(self, ctx: TaskContext) -> TaskParts:
        cfg = ctx.cfg
        assert isinstance(cfg, GRPOCommandConfig)
        g, t = cfg.grpo, cfg.training
        native = ctx.bundle.native
        if native is None:
            raise ConfigError(
                "model.path",
                "codex-ml grpo samples with the native KV-cache decoder: use a native run, or a Llama-family "
                "Hugging Face model (converted exactly; model.native_conversion=true)",
            )
        longest = max(len(ctx.tokenizer.encode(p.prompt)) for p in self.problems)
        if longest >= native.config.max_seq_len:
            raise ConfigError(
                "data.paths", f"a prompt of {longest} tokens leaves no room in the model's context of {native.config.max_seq_len}"
            )
        stats = StepStats()
        functions = {name: self._bind(plugins.rewards.get(name), cfg) for name in g.rewards}
        metrics = {name: plugins.metrics.get(name) for name in g.metrics}
        reference = copy.deepcopy(native).eval().requires_grad_(False) if g.beta > 0 else None  # the starting weights
        scale = g.scale_rewards or ("none" if g.loss_type == "dr_grpo" else "group")
        settings = RolloutSettings(
            group_size=g.group_size,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            iterations=g.iterations,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            stop=list(g.stop),
            scale_rewards=scale,
            mask_truncated=g.mask_truncated,
            seed=t.seed,
            rank=ctx.dist.rank,
            world_size=ctx.dist.world_size,
        )
        logps = lambda model, batch: completion_logps(model, batch, g.temperature)
        batches = RolloutBatches(
            self.problems,
            ctx.tokenizer,
            native,
            RewardScorer(functions, list(g.reward_weights)),
            settings,
            logps,
            ctx.device,
            stats,
            reference=reference,
            metrics=metrics,
        )
        loss_type = g.loss_type

        def measure(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            mask = batch["completion_mask"]
            return grpo_units(mask, batch["valid"], loss_type), mask.sum()

        return TaskParts(
            batches=batches,
            evaluate=lambda whole_split=False: self._evaluate(cfg, native, ctx.tokenizer),
            loss_module=GRPOLoss(ctx.compiled, cfg, stats),
            dataset=problems_record(list(cfg.data.paths), self.problems),
            measure=measure,
            step_metrics=stats.drain,
        )

    def _box(self, cfg: GRPOCommandConfig) -> Sandbox:
        if self.sandbox is None:
            g = cfg.grpo
            workers = g.workers or min(len(os.sched_getaffinity(0)), cfg.training.batch_size)
            self.sandbox = Sandbox(g.sandbox, workers=workers, memory_mb=g.memory_mb)
        return self.sandbox

    def _bind(self, fn: Any, cfg: GRPOCommandConfig) -> Any:
        """A reward that judges in a sandbox (``bind``) gets the run's shared one; others are used as they are."""
        return fn.bind(self._box(cfg), cfg.grpo.timeout) if hasattr(fn, "bind") else fn

    def _evaluate(self, cfg: GRPOCommandConfig, native: torch.nn.Module, tokenizer: CodeTokenizer) -> dict:
        """Greedy pass@1 on ``grpo.eval_paths`` (judged in the sandbox); nothing when no held-out problems are given."""
        if not self.eval_problems:
            return {}
        g = cfg.grpo
        prompts = [p.prompt for p in self.eval_problems]
        settings = SamplingSettings(max_new_tokens=g.max_new_tokens, temperature=0.0, n=1, stop=list(g.stop))
        texts = [group[0].text for group in generate(native, tokenizer, prompts, settings)]
        judge = ExecutionReward().bind(self._box(cfg), g.timeout)
        scores = judge(
            prompts=prompts,
            completions=texts,
            test=[p.test for p in self.eval_problems],
            entry_point=[p.entry_point for p in self.eval_problems],
        )
        judged = [s for s in scores if s is not None]
        return {"val_pass@1": sum(judged) / len(judged) if judged else float("nan"), "val_problems": len(judged)}
