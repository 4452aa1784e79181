"""Recipe: `codex-ml dpo`, Direct Preference Optimisation on the one loop.

The policy's log-probabilities of each completion are compared with a frozen reference's:
the starting weights (a frozen copy), ``dpo.reference_path`` (another model directory), or, with
LoRA, the same module with its adapters switched off (no copy). ``dpo.precompute_ref_logps``
computes the reference's log-probabilities of every pair once before training, caches them in the
run folder, and keeps no reference in memory. Train events carry TRL's figures:
``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from codex_ml.conf.schema import DPOCommandConfig, DPOSettings, TrainConfig
from codex_ml.data.preferences import Pair, PreferenceSplits, eval_pair_batches
from codex_ml.errors import CodexError
from codex_ml.models.loss import dpo_loss, sequence_logps
from codex_ml.recipes.models import build_model
from codex_ml.recipes.preference_task import (
    StepStats,
    encode_pairs,
    pair_figures,
    pair_measure,
    prepare_preferences,
    train_batches,
)
from codex_ml.recipes.train import TaskContext, TaskParts, final_metric, train
from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.training.checkpoint import load_torch_file, torch_bytes
from codex_ml.training.distributed import Distributed

REF_LOGPS_FILE = "ref_logps.pt"  # in the run folder: the reference's log-probabilities, computed once

Forward = Callable[[dict], torch.Tensor]  # batch -> logits


class Reference:
    """The frozen reference's (chosen, rejected) log-probabilities of a batch: computed, or looked up."""

    def __init__(self, forward: Forward | None, context: Callable[[], contextlib.AbstractContextManager], describe: str) -> None:
        self.forward, self.context, self.describe = forward, context, describe
        self.table: dict[str, torch.Tensor] = {}  # split -> (pairs, 2), when precomputed

    def logps(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split in self.table:
            found = self.table[split].to(batch["index"].device)[batch["index"]]
            return found[:, 0], found[:, 1]
        assert self.forward is not None  # a reference without a forward is precomputed for every split
        with torch.no_grad(), self.context():
            logps, _ = sequence_logps(self.forward(batch), batch["labels"])
        chosen, rejected = logps.chunk(2)
        return chosen, rejected


class DPOObjective(torch.nn.Module):
    """``forward(batch)``: the DPO loss summed over the batch's pairs (DDP wraps this module; the
    reference is deliberately not a submodule: it is never trained, synchronised or put in train mode)."""

    def __init__(self, model: torch.nn.Module, forward: Forward, reference: Reference, settings: DPOSettings) -> None:
        super().__init__()
        self.model = model
        self.policy_forward, self.settings = forward, settings
        self.reference = [reference]  # a list: nn.Module would not register it anyway, but says so
        self.stats = StepStats()

    def pair_terms(self, batch: dict, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss per pair, TRL's figures per pair)."""
        logps, tokens = sequence_logps(self.policy_forward(batch), batch["labels"])
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        ref_chosen, ref_rejected = self.reference[0].logps(batch, split)
        s = self.settings
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, s.beta, s.loss_type, chosen_tokens, rejected_tokens
        )
        figures = pair_figures(chosen_rewards, rejected_rewards)
        figures.update({"logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()})
        return losses, figures

    def forward(self, batch: dict) -> torch.Tensor:
        losses, figures = self.pair_terms(batch, "train")
        self.stats.add(figures)
        return losses.sum()


class DPOTask:
    """DPO's side of the loop: pairs, the reference, validation on held-out pairs."""

    name = "dpo"
    hf_engine = False

    def __init__(self, settings: DPOSettings) -> None:
        self.settings = settings

    def prepare(self, cfg: TrainConfig, run_dir: Path, dist: Distributed) -> tuple[CodeTokenizer, Any]:
        return prepare_preferences(cfg, run_dir, dist)

    def parts(self, ctx: TaskContext) -> TaskParts:
        cfg, dist = ctx.cfg, ctx.dist
        splits = encode_pairs(ctx)
        reference = build_reference(ctx, self.settings)
        if self.settings.precompute_ref_logps:
            reference.table = precomputed_logps(ctx, splits, reference)
            reference.forward = None  # nothing of the reference stays in memory
        objective = DPOObjective(ctx.compiled, ctx.bundle.forward_with(ctx.compiled), reference, self.settings)
        eval_objective = DPOObjective(ctx.model, ctx.bundle.forward_with(ctx.model), reference, self.settings)
        ctx.log(f"dpo: reference {reference.describe}; beta {self.settings.beta}, loss {self.settings.loss_type}")

        def evaluate(whole_split: bool = False) -> dict:
            """The DPO loss and TRL's reward figures over every held-out pair."""
            ctx.model.eval()
            names = ["rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"]
            total = torch.zeros(len(names) + 2, dtype=torch.float64, device=ctx.device)  # loss, figures..., pairs
            with torch.no_grad():
                for batch in _on(
                    ctx.device,
                    eval_pair_batches(splits.val, cfg.training.batch_size, ctx.tokenizer.pad_id, dist.rank, dist.world_size),
                ):
                    with ctx.autocast():
                        losses, figures = eval_objective.pair_terms(batch, "val")
                    sums = (
                        [losses.sum()] + [figures[n].sum() for n in names] + [torch.tensor(float(len(losses)), device=ctx.device)]
                    )
                    total += torch.stack([v.double() for v in sums])
            if dist.enabled:
                total = dist.all_reduce_sum(total)
            values = total.tolist()
            pairs = max(values[-1], 1)
            return {
                "val_loss": values[0] / pairs,
                **{f"val_{n}": v / pairs for n, v in zip(names, values[1:-1])},
                "val_pairs": int(values[-1]),
            }

        return TaskParts(
            batches=train_batches(ctx, splits),
            evaluate=evaluate,
            loss_module=objective,
            dataset=splits.record(", ".join(cfg.data.paths)),
            measure=pair_measure,
            step_metrics=objective.stats.take,
        )


def _on(device: torch.device, batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        yield {k: v.to(device) for k, v in batch.items()}


def build_reference(ctx: TaskContext, settings: DPOSettings) -> Reference:
    """The reference the policy is measured against; built while the model still holds its starting
    weights (the parts are built before a resumed checkpoint is loaded), so every run compares with them."""
    cfg, bundle = ctx.cfg, ctx.bundle
    if settings.reference_path:
        ref_cfg = copy.deepcopy(cfg)
        ref_cfg.model = dataclasses.replace(cfg.model, path=settings.reference_path)
        ref_cfg.lora = dataclasses.replace(cfg.lora, enabled=False)
        ref = build_model(ref_cfg, len(ctx.tokenizer), ctx.device, log=lambda m: None)
        ref.module.eval().requires_grad_(False)
        return Reference(ref.forward_with(ref.module), contextlib.nullcontext, f"{settings.reference_path} ({ref.describe})")
    if cfg.lora.enabled:
        disable = getattr(ctx.model, "disable_adapter", None)
        if disable is None:
            raise CodexError("dpo: the LoRA-wrapped model has no disable_adapter(); set dpo.reference_path=DIR")
        return Reference(bundle.forward_with(ctx.model), disable, "the base model with the LoRA adapters off (no copy)")
    if settings.precompute_ref_logps:
        # the policy holds the starting weights now: its log-probabilities are the reference's
        return Reference(bundle.forward_with(ctx.model), contextlib.nullcontext, "the starting weights (precomputed)")
    frozen = copy.deepcopy(ctx.model).eval().requires_grad_(False)
    return Reference(bundle.forward_with(frozen), contextlib.nullcontext, "a frozen copy of the starting weights")


def _fingerprint(ctx: TaskContext, splits: PreferenceSplits, reference: Reference) -> str:
    """What the cached log-probabilities depend on: the pairs' tokens and the reference model."""
    h = hashlib.sha256()
    for name, pairs in (("train", splits.train), ("val", splits.val)):
        h.update(name.encode())
        for p in pairs:
            h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    h.update(
        json.dumps(
            {"reference": reference.describe, "model": ctx.bundle.source, "lora": ctx.cfg.lora.enabled}, default=str
        ).encode()
    )
    return h.hexdigest()


def precomputed_logps(ctx: TaskContext, splits: PreferenceSplits, reference: Reference) -> dict[str, torch.Tensor]:
    """split -> (pairs, 2) reference log-probabilities; read from the run folder when it has them for these pairs."""
    path = ctx.run_dir / REF_LOGPS_FILE
    fingerprint = _fingerprint(ctx, splits, reference)
    if path.exists():
        cached = load_torch_file(path)
        if cached.get("fingerprint") == fingerprint:
            ctx.log(f"dpo: reference log-probabilities from {path}")
            return {k: cached[k] for k in ("train", "val")}
        if ctx.dist.is_main:
            ctx.log(f"dpo: {path} is for other pairs or another reference: computing them again")
    table = {name: _logps_of(ctx, pairs, reference) for name, pairs in (("train", splits.train), ("val", splits.val))}
    if ctx.dist.is_main:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(torch_bytes({"fingerprint": fingerprint, **table}))
        tmp.replace(path)
    return table


def _logps_of(ctx: TaskContext, pairs: list[Pair], reference: Reference) -> torch.Tensor:
    was_training = ctx.model.training
    ctx.model.eval()
    out = []
    for batch in _on(ctx.device, eval_pair_batches(pairs, ctx.cfg.training.batch_size, ctx.tokenizer.pad_id)):
        with ctx.autocast():
            chosen, rejected = reference.logps(batch, "none")
        out.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    ctx.model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def dpo_command(cfg: DPOCommandConfig) -> float:
    from codex_ml.sweep import sweep_context

    job_dir, sweep = sweep_context()
    metrics = train(cfg, sweep_job_dir=job_dir, sweep=sweep, task=DPOTask(cfg.dpo))
    return final_metric(metrics, cfg.training.best_metric)
