"""Recipe: `codex-ml generate`, sampling from a run's checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

from codex_ml.conf.schema import GenerateConfig
from codex_ml.data.fim import fim_prompt
from codex_ml.data.secrets import mask_secrets
from codex_ml.errors import CodexError
from codex_ml.eval.generate import SamplingSettings, generate
from codex_ml.recipes.checkpoints import load_run_model
from codex_ml.training.device import resolve_device


def generate_command(cfg: GenerateConfig) -> None:
    device = resolve_device(cfg.device)
    assert cfg.run_dir is not None  # validate_generate requires it
    model, tokenizer, ckpt = load_run_model(Path(cfg.run_dir), cfg.checkpoint, device)
    print(f"# {ckpt}", file=sys.stderr)
    settings = SamplingSettings(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        n=cfg.n,
        seed=cfg.seed,
        stop=list(cfg.stop),
        compile=cfg.compile,
    )
    prompt = cfg.prompt
    request: list[str] | list[list[int]]
    if cfg.suffix is not None:
        # infilling: the model writes the middle between prompt and suffix (fill-in-the-middle, PSM)
        ids = tokenizer.fim_ids
        prefix, middle, suffix = ids["prefix"], ids["middle"], ids["suffix"]
        if prefix is None or middle is None or suffix is None:
            raise CodexError("suffix=... asks for infilling, but the run's tokenizer has no fill-in-the-middle tokens")
        roles = (prefix, middle, suffix)
        request = [fim_prompt(tokenizer.encode(prompt), tokenizer.encode(cfg.suffix), roles)]
    else:
        request = [prompt]
    completions = generate(model, tokenizer, request, settings)[0]
    for i, c in enumerate(completions):
        if cfg.n > 1:
            print(f"# sample {i + 1}/{cfg.n} ({c.finish_reason})")
        # the completion masked alone: the prompt and suffix are the user's own text
        text = mask_secrets(c.text)[0] if cfg.redact_output else c.text
        print(prompt + text + (cfg.suffix or ""))
