"""LoRA fine-tuning through codex-ml vs a plain PEFT + Hugging Face Trainer script, in one run.

The model is a Llama-architecture checkpoint saved with ``save_pretrained`` (the `tiny` preset's
shape, vocabulary 4096) in a temporary folder; both sides load it from there, wrap it with the
same LoRA adapters (r=8, alpha=16, every projection) and train on the same windows of the
standard-library corpus with AdamW, the same schedule and precision. codex-ml goes through its
own path for `model=hf lora.enabled=true`: the checkpoint loaded exactly into the native decoder,
PEFT on top, our loop. The reference is what a user writes by hand: AutoModelForCausalLM,
get_peft_model, Trainer. Each side runs in its own process (rounds interleaved, medians); the
table shows tokens/s and peak memory (GPU memory allocated, or resident memory on CPU), and the
ratio printed last is codex-ml's tokens/s over the reference's.

    python benchmarks/finetune.py            # about four minutes on 2 cores
    python benchmarks/finetune.py --smoke    # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from common import (
    WindowDataset,
    auto_precision,
    machine_line,
    peak_memory_mb,
    prepared_windows,
    run_our_loop,
    run_variants,
    step_clock,
)

VARIANTS = {"peft-trainer": "PEFT + HF Trainer (plain script)", "codex-ml": "codex-ml (model=hf lora.enabled=true)"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_base_model(directory: Path, tokenizer_dir: Path, vocab: int, max_len: int) -> None:
    """A Llama checkpoint of the tiny preset's shape, as a user would download it, with the tokenizer."""
    import shutil

    from codex_ml.conf.schema import TrainConfig
    from codex_ml.models.convert import native_to_hf
    from codex_ml.models.gpt import GPT
    from codex_ml.recipes.models import native_config

    cfg = TrainConfig()
    cfg.model.max_seq_len = max_len
    torch.manual_seed(0)
    native_to_hf(GPT(native_config(cfg, vocab))).save_pretrained(str(directory))
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, directory / f.name)


def run_reference(path: Path, stream, args, device: torch.device) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    clock = step_clock()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=10,
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=device.type == "cpu",
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            bf16=args.precision == "bf16",
        )
        Trainer(model=model, args=targs, train_dataset=WindowDataset(stream, args.seq_len), callbacks=[clock]).train()
    s = clock.stamps
    return (args.steps - args.warmup) * args.batch_size * args.seq_len / (s[args.steps] - s[args.warmup])


def run_codex_ml(path: Path, stream, args, device: torch.device) -> float:
    from codex_ml.conf.schema import TrainConfig
    from codex_ml.recipes.models import build_model
    from codex_ml.runtime import tune_allocator

    tune_allocator()  # what `codex-ml` does at start-up
    cfg = TrainConfig()
    cfg.model.kind, cfg.model.path = "hf", str(path)
    cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules = True, 8, 16, TARGETS
    bundle = build_model(cfg, 0, device, log=lambda m: None)
    return run_our_loop(
        bundle.module,
        bundle.loss_sum_with(bundle.module),
        stream,
        args.steps,
        args.warmup,
        args.batch_size,
        args.seq_len,
        args.lr,
        args.precision,
        device,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.seq_len, args.rounds = 6, 2, 4, 32, 1
    args.precision = auto_precision(args.precision)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    vocab = 1024 if args.smoke else 4096
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.variant:
        _, stream = prepared_windows(args.seq_len, vocab)
        run = run_codex_ml if args.variant == "codex-ml" else run_reference
        tps = run(Path(args.model_dir), stream, args, device)
        print(json.dumps({"tokens_per_s": tps, "peak_memory_mb": peak_memory_mb(device)}))
        return

    prepared, _ = prepared_windows(args.seq_len, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama"
        save_base_model(model_dir, prepared.tokenizer_dir, len(prepared.tokenizer), max(args.seq_len, 128))
        print(
            f"model: Llama checkpoint of the tiny preset's shape; LoRA r=8 alpha=16 on {len(TARGETS)} projections; "
            f"batch {args.batch_size} x {args.seq_len}; {args.steps} steps timed after {args.warmup}; {args.precision}; "
            f"{args.rounds} interleaved round(s), each side in its own process"
        )
        print(machine_line())
        passthrough = [
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--batch-size={args.batch_size}",
            f"--seq-len={args.seq_len}",
            f"--lr={args.lr}",
            f"--precision={args.precision}",
            f"--model-dir={model_dir}",
        ] + (["--smoke"] if args.smoke else [])
        res = run_variants(__file__, VARIANTS, passthrough, args.rounds)
    anchor = res["peft-trainer"]["tokens_per_s"]
    print(f"\n| {'variant':<40} | tokens/s | peak memory (MB) | vs reference |")
    print(f"|{'-' * 42}|----------|------------------|--------------|")
    for variant, name in VARIANTS.items():
        r = res[variant]
        print(f"| {name:<40} | {r['tokens_per_s']:8.0f} | {r['peak_memory_mb']:16.0f} | {r['tokens_per_s'] / anchor:11.2f}x |")
    print(f"\nratio: {res['codex-ml']['tokens_per_s'] / anchor:.2f}  (codex-ml LoRA tokens/s over PEFT + HF Trainer)")


if __name__ == "__main__":
    main()
