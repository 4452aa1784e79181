"""Recipe: `codex-ml generate`, sampling from a run's checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from codex_ml.conf.schema import GenerateConfig
from codex_ml.eval.generate import SamplingSettings, generate
from codex_ml.recipes.checkpoints import load_run_model
from codex_ml.training.device import resolve_device


def generate_command(cfg: GenerateConfig) -> None:
    device = resolve_device(cfg.device)
    model, tokenizer, ckpt = load_run_model(Path(cfg.run_dir), cfg.checkpoint, device)
    print(f"# {ckpt}", file=sys.stderr)
    settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                top_p=cfg.top_p, n=cfg.n, seed=cfg.seed, stop=list(cfg.stop))
    torch.manual_seed(cfg.seed)
    prompt = cfg.prompt
    completions = generate(model, tokenizer, [prompt], settings)[0]
    for i, c in enumerate(completions):
        if cfg.n > 1:
            print(f"# sample {i + 1}/{cfg.n} ({c.finish_reason})")
        print(prompt + c.text)
