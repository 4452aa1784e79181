"""Helpers for the tests: a small real-code corpus, tiny configs, and running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "codex_ml.cli"]

# A model small enough to train in seconds on CPU.
TINY_MODEL = [
    "model=tiny",
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=2",
    "model.n_kv_head=1",
    "model.d_ff=64",
    "model.max_seq_len=64",
]


def stdlib_sample(n: int = 40) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 30_000)
    return files[:n]


def data_args(corpus: Path, seq_len: int = 32, vocab: int = 400) -> list[str]:
    return [
        "data.source=files",
        f"data.paths=[{corpus}]",
        f"data.seq_len={seq_len}",
        "data.num_workers=0",
        f"tokenizer.vocab_size={vocab}",
    ]


def tiny_train_args(corpus: Path, run_dir: Path, steps: int = 12, extra: list[str] | None = None) -> list[str]:
    return [
        *TINY_MODEL,
        *data_args(corpus),
        f"run.dir={run_dir}",
        f"training.max_steps={steps}",
        "training.batch_size=4",
        "training.log_every=2",
        "training.checkpoint_every=4",
        "training.eval_batches=2",
        "training.warmup_steps=2",
        "training.sample_tokens=8",
        "tracking.mlflow=false",
        *(extra or []),
    ]


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"codex-ml {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def tiny_hf_model(arch: str, tokenizer, max_positions: int = 128, dropout: bool = True):
    """A two-layer Hugging Face causal LM of ``arch`` (llama, qwen2, gpt2, gpt_neox, phi3) built from config, with the
    token ids of ``tokenizer``; ``dropout=False`` for runs compared across ranks (they would draw other masks)."""
    import transformers

    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if arch == "gpt2":
        off = {} if dropout else dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=max_positions, **off, **ids
        )
        return transformers.GPT2LMHeadModel(config)
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        **ids,
    )
    kinds = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", 2),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 2),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", 2),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", None),
    }
    config_name, model_name, kv_heads = kinds[arch]
    if kv_heads is not None:
        shape["num_key_value_heads"] = kv_heads
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**shape))


def save_tiny_hf_models(root: Path, archs: list[str], corpus: Path | None = None, **options) -> Path:
    """Save ``tiny_hf_model`` of each arch under ``root/ARCH`` with a tokenizer of ours (trained on ``corpus`` into
    ``root/tok`` unless it is there already); seeded, so the weights are the same in every test session."""
    import torch
    from transformers import AutoTokenizer

    if not (root / "tok" / "tokenizer.json").exists():
        assert corpus is not None, "a corpus to train the tokenizer on"
        run_cli("tokenizer", *data_args(corpus), f"out={root / 'tok'}")
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    torch.manual_seed(0)
    for arch in archs:
        model = tiny_hf_model(arch, tok, **options)
        model.save_pretrained(str(root / arch))
        tok.save_pretrained(str(root / arch))
    return root
