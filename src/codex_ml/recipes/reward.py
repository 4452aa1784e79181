"""Recipe: `codex-ml reward`, a pairwise (Bradley-Terry) reward model trained on the one loop.

The decoder plus a scalar head (``models/reward.py``) scores each sequence at its last token; the
loss is ``-log sigmoid(r_chosen - r_rejected - reward.margin)`` (+ ``reward.center_coefficient`` *
(r_chosen + r_rejected)^2). Validation logs ``val_accuracy`` (held-out pairs ranked right) and
``val_loss``; the evaluation over the whole split also writes every held-out pair's scores to
``RUN/eval/reward_scores.jsonl``. ``codex-ml export`` writes the run as a sequence classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from codex_ml.conf.schema import RewardCommandConfig, RewardSettings, TrainConfig
from codex_ml.data.preferences import Pair, PreferenceSplits, eval_pair_batches
from codex_ml.models.loss import pairwise_reward_loss
from codex_ml.models.reward import HEAD_WEIGHTS, RewardHead
from codex_ml.recipes.preference_task import (
    StepStats,
    encode_pairs,
    hidden_size,
    hidden_states_with,
    pair_figures,
    pair_measure,
    prepare_preferences,
    train_batches,
)
from codex_ml.recipes.train import TaskContext, TaskParts, final_metric, train
from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.training.distributed import Distributed

SCORES_FILE = "eval/reward_scores.jsonl"


class RewardObjective(torch.nn.Module):
    """``forward(batch)``: the Bradley-Terry loss summed over the batch's pairs (DDP wraps this module)."""

    def __init__(self, model: torch.nn.Module, hidden: Any, head: RewardHead, settings: RewardSettings) -> None:
        super().__init__()
        self.model, self.head = model, head  # registered: DDP synchronises the decoder and the head
        self.hidden, self.settings = hidden, settings
        self.stats = StepStats()

    def scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards, rejected rewards) of the batch's pairs."""
        rewards = self.head(self.hidden(batch), batch["lengths"])
        return rewards.chunk(2)

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return pairwise_reward_loss(chosen, rejected, self.settings.margin, self.settings.center_coefficient)

    def forward(self, batch: dict) -> torch.Tensor:
        chosen, rejected = self.scores(batch)
        self.stats.add(pair_figures(chosen.detach(), rejected.detach()))
        return self.pair_losses(chosen, rejected).sum()


class RewardTask:
    """The reward model's side of the loop: pairs, the scalar head, validation accuracy."""

    name = "reward"
    hf_engine = False

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings

    def prepare(self, cfg: TrainConfig, run_dir: Path, dist: Distributed) -> tuple[CodeTokenizer, Any]:
        return prepare_preferences(cfg, run_dir, dist)

    def parts(self, ctx: TaskContext) -> TaskParts:
        cfg, dist = ctx.cfg, ctx.dist
        splits = encode_pairs(ctx)
        head = RewardHead(hidden_size(ctx.bundle), cfg.model.init_std).to(ctx.device)
        objective = RewardObjective(ctx.compiled, hidden_states_with(ctx.bundle, ctx.compiled), head, self.settings)
        eval_model = RewardObjective(ctx.model, hidden_states_with(ctx.bundle, ctx.model), head, self.settings)

        def evaluate(whole_split: bool = False) -> dict:
            """Loss and accuracy over every held-out pair (the split is small; ``whole_split`` also writes the scores)."""
            ctx.model.eval()
            head.eval()
            total = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, pairs ranked right, pairs
            rows: list[dict] = []
            with torch.no_grad():
                for batch in eval_pair_batches(
                    splits.val, cfg.training.batch_size, ctx.tokenizer.pad_id, dist.rank, dist.world_size
                ):
                    batch = {k: v.to(ctx.device) for k, v in batch.items()}
                    with ctx.autocast():
                        chosen, rejected = eval_model.scores(batch)
                    losses = eval_model.pair_losses(chosen, rejected)
                    total += torch.stack(
                        [
                            losses.sum().double(),
                            (chosen > rejected).sum().double(),
                            torch.tensor(float(len(losses)), dtype=torch.float64, device=ctx.device),
                        ]
                    )
                    if whole_split:
                        rows += _score_rows(splits.val, batch["index"].tolist(), chosen.tolist(), rejected.tolist())
            if dist.enabled:
                total = dist.all_reduce_sum(total)
            loss_sum, right, pairs = total.tolist()
            if whole_split:
                gathered = dist.gather_objects(rows)
                if dist.is_main:
                    _write_scores(ctx.run_dir / SCORES_FILE, [r for part in gathered for r in part])
            return {"val_loss": loss_sum / max(pairs, 1), "val_accuracy": right / max(pairs, 1), "val_pairs": int(pairs)}

        return TaskParts(
            batches=train_batches(ctx, splits),
            evaluate=evaluate,
            loss_module=objective,
            dataset=splits.record(", ".join(cfg.data.paths)),
            measure=pair_measure,
            step_metrics=objective.stats.take,
            trainable=torch.nn.ModuleDict({"model": ctx.model, "head": head}),
            checkpoint_files=head.files,
            load_checkpoint=lambda path: head.load((path / HEAD_WEIGHTS).read_bytes()),
        )


def _score_rows(pairs: list[Pair], index: list[int], chosen: list[float], rejected: list[float]) -> list[dict]:
    """One line per pair; a pair cut to data.seq_len is left out: its scores are of a prefix of its text."""
    return [
        {"id": pairs[i].id, **pairs[i].text, "score_chosen": c, "score_rejected": r}
        for i, c, r in zip(index, chosen, rejected)
        if not pairs[i].truncated
    ]


def _write_scores(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def reward_command(cfg: RewardCommandConfig) -> float:
    from codex_ml.sweep import sweep_context

    job_dir, sweep = sweep_context()
    metrics = train(cfg, sweep_job_dir=job_dir, sweep=sweep, task=RewardTask(cfg.reward))
    return final_metric(metrics, cfg.training.best_metric)


__all__ = ["PreferenceSplits", "RewardObjective", "RewardTask", "reward_command"]
