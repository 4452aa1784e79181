"""Recipe piece: what the reward model and DPO share on the one loop: their data and their forward passes.

Both read preference pairs (``data/preferences.py``), check every record before anything is
written, train on the model's own tokenizer, and log per-pair figures through the loop's
``step_metrics`` under TRL's names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from codex_ml.conf.schema import ConfigError, TrainConfig
from codex_ml.data.preferences import PairBatches, PairEncoder, PreferenceSplits, prepare_pairs, read_preferences
from codex_ml.recipes.models import ModelBundle, unwrapped
from codex_ml.recipes.train import TaskContext, sft_tokenizer
from codex_ml.runs import TOKENIZER_DIR
from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.training.distributed import Distributed


def prepare_preferences(cfg: TrainConfig, run_dir: Path, dist: Distributed) -> tuple[CodeTokenizer, Any]:
    """Every record checked first (a bad one stops the run before it writes anything), then the tokenizer."""
    if cfg.data.seq_len is not None and cfg.data.seq_len < 2:
        raise ConfigError("data.seq_len", "a pair needs at least a prompt token and a completion token")
    records = read_preferences(list(cfg.data.paths), cfg.data.id_field)
    tokenizer = sft_tokenizer(cfg, run_dir) if dist.is_main else None
    dist.barrier()
    return tokenizer or CodeTokenizer.load(run_dir / TOKENIZER_DIR), records


def encode_pairs(ctx: TaskContext) -> PreferenceSplits:
    """The pairs tokenized with the run's tokenizer, cut to ``data.seq_len`` (resolved once the model exists)."""
    cfg = ctx.cfg
    assert cfg.data.seq_len is not None  # resolved from the model before the parts are built
    records, sha256 = ctx.data
    splits = prepare_pairs(
        records,
        PairEncoder(ctx.run_dir / TOKENIZER_DIR),
        cfg.data.seq_len,
        cfg.data.val_fraction,
        cfg.tokenizer.truncation_side,
        sha256,
    )
    if ctx.dist.is_main:
        ctx.log(
            f"data: {len(splits.train)} training pairs, {len(splits.val)} validation; {splits.truncated} cut to "
            f"data.seq_len={cfg.data.seq_len}, {splits.dropped} dropped (the prompt alone fills it)"
        )
    return splits


def train_batches(ctx: TaskContext, splits: PreferenceSplits) -> PairBatches:
    t, dist = ctx.cfg.training, ctx.dist
    return PairBatches(splits.train, t.batch_size, t.seed, ctx.tokenizer.pad_id, dist.rank, dist.world_size)


def pair_measure(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs, tokens): the loss is a mean over pairs; every token of both rows is computed on."""
    lengths = batch["lengths"]
    return torch.tensor(float(batch["index"].numel()), dtype=torch.float64, device=lengths.device), lengths.sum().double()


def hidden_states_with(bundle: ModelBundle, module: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    """batch -> the decoder's final normalised hidden states (B, T, D), before the LM head."""
    if bundle.native is not None:
        return lambda batch: module(batch["input_ids"], return_hidden=True)
    # a Hugging Face causal LM's decoder (LoRA layers sit inside it); nn.Module attributes are typed Tensor | Module
    backbone = cast(torch.nn.Module, unwrapped(module).base_model)
    return lambda batch: backbone(input_ids=batch["input_ids"], use_cache=False).last_hidden_state


def hidden_size(bundle: ModelBundle) -> int:
    if bundle.native is not None:
        return bundle.native.config.d_model
    return int(cast(Any, unwrapped(bundle.module)).config.hidden_size)  # a Hugging Face model's config


class StepStats:
    """Per-pair figures summed on the device over one optimizer step: ``name -> tensor([sum, count])``."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, v in values.items():
            entry = torch.stack([v.detach().double().sum(), torch.tensor(float(v.numel()), dtype=torch.float64, device=v.device)])
            self.sums[name] = self.sums[name] + entry if name in self.sums else entry

    def take(self) -> dict[str, torch.Tensor]:
        out, self.sums = self.sums, {}
        return out


def pair_figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward figures of a batch of pairs (per pair; the loop averages them)."""
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
    }
