"""What the reward and DPO tests share: preference pairs, a tiny model, in-process runs of the one loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from codex_ml.conf.schema import DPOCommandConfig, RewardCommandConfig, validate_dpo, validate_reward

FAMILIES = [("add", "+", "plus"), ("sub", "-", "minus"), ("mul", "*", "times"), ("mod", "%", "modulo")]


def pair_rows(n: int) -> list[dict]:
    """``n`` pairs: a function's correct body is chosen, a broken one rejected."""
    rows = []
    for i in range(n):
        name, op, word = FAMILIES[i % 4]
        k = 2 + i // 4
        prompt = f'def {name}_{k}(x):\n    """Return x {word} {k}."""\n'
        broken = [f"    retrun x {op} {k}\n", f"    return x {op}\n", f"    return (x {op} {k}\n", f"  return x {op} {k}\n"][
            i % 4
        ]
        rows.append({"prompt": prompt, "chosen": f"    return x {op} {k}\n", "rejected": broken})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(kind: str, model_dir: Path, prefs: Path, run_dir: Path, **training) -> DPOCommandConfig | RewardCommandConfig:
    """A tiny, deterministic run of ``codex-ml reward`` or ``dpo`` on a local Hugging Face model, checked as the CLI checks it."""
    cfg = DPOCommandConfig() if kind == "dpo" else RewardCommandConfig()
    cfg.model.kind, cfg.model.path = "hf", str(model_dir)
    cfg.data.source, cfg.data.paths, cfg.data.seq_len, cfg.data.val_fraction = "sft", [str(prefs)], 48, 0.25
    cfg.run.dir = str(run_dir)
    cfg.tracking.mlflow = False
    t = cfg.training
    t.batch_size, t.max_steps, t.lr, t.warmup_steps, t.log_every = 4, 4, 1e-3, 0, 1
    t.checkpoint_every, t.eval_every, t.sample_tokens, t.deterministic, t.keep_last = 2, 0, 0, True, 5
    for key, value in training.items():
        section, _, name = key.rpartition("__")
        setattr(getattr(cfg, section) if section else t, name, value)
    (validate_dpo if kind == "dpo" else validate_reward)(cfg)
    return cfg


def events(run_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.ndjson").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == kind]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight file of the newest checkpoint (the decoder's and a reward head's)."""
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def crash_after(run_dir: Path, step: int) -> None:
    """Leave ``run_dir`` as a run killed right after its checkpoint at ``step``: later checkpoints gone."""
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
