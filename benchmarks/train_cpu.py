"""Our training loop vs the Hugging Face Trainer on CPU: same model, same data, same batch, one run.

The model is the `tiny` preset, built twice from the same weights: as our native decoder for our
loop, and as `LlamaForCausalLM` (the same architecture, see models/convert.py) for the Trainer. All
variants train with AdamW, a cosine schedule and the same precision (bf16 autocast where the CPU
has native bf16, else fp32) on the same windows of the standard-library corpus, each in its own
process. Throughput is measured after warm-up steps from step timestamps; rounds are interleaved
and the median counts. The ratio printed last is our compiled loop over the stock Trainer; the
table also shows the Trainer with torch_compile=True and our loop without compiling.

    python benchmarks/train_cpu.py            # about five minutes on 2 cores
    python benchmarks/train_cpu.py --smoke    # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from common import (
    WindowDataset,
    auto_precision,
    machine_line,
    prepared_windows,
    run_our_loop,
    run_variants,
    step_clock,
)

VARIANTS = {
    "hf": "HF Trainer",
    "hf-compile": "HF Trainer, torch_compile=True",
    "ours": "codex-ml loop",
    "ours-compile": "codex-ml loop, training.compile=true",
}


def run_hf_trainer(model, stream, args, compile: bool) -> float:
    from transformers import Trainer, TrainingArguments

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
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            torch_compile=compile,
            bf16=args.precision == "bf16",
        )
        Trainer(model=model, args=targs, train_dataset=WindowDataset(stream, args.seq_len), callbacks=[clock]).train()
    s = clock.stamps
    return (args.steps - args.warmup) * args.batch_size * args.seq_len / (s[args.steps] - s[args.warmup])


def measure(variant: str, args) -> float:
    """Tokens/s of one variant, in this process."""
    from codex_ml.conf.schema import TrainConfig
    from codex_ml.models.convert import native_to_hf
    from codex_ml.models.gpt import GPT
    from codex_ml.recipes.models import native_config, native_loss_sum

    if variant.startswith("ours"):
        from codex_ml.runtime import tune_allocator

        tune_allocator()  # what `codex-ml` does at start-up
    prepared, stream = prepared_windows(args.seq_len, 1024 if args.smoke else 4096)
    cfg = TrainConfig()
    cfg.model.max_seq_len = max(args.seq_len, 128)
    torch.manual_seed(0)
    native = GPT(native_config(cfg, len(prepared.tokenizer)))  # the same initial weights for every variant
    compile = variant.endswith("compile")
    if variant.startswith("ours"):
        loss_sum = native_loss_sum(torch.compile(native) if compile else native)
        return run_our_loop(
            native,
            loss_sum,
            stream,
            args.steps,
            args.warmup,
            args.batch_size,
            args.seq_len,
            args.lr,
            args.precision,
            torch.device("cpu"),
        )
    return run_hf_trainer(native_to_hf(native), stream, args, compile)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the same for every variant; auto: bf16 where the CPU computes it natively (AVX512-BF16, AMX)",
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats; the median counts")
    p.add_argument("--smoke", action="store_true", help="a few steps of a smaller batch")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = p.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.seq_len, args.rounds = 6, 2, 4, 32, 1
    args.precision = auto_precision(args.precision)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.variant:
        print(json.dumps({"tokens_per_s": measure(args.variant, args)}))
        return

    prepared_windows(args.seq_len, 1024 if args.smoke else 4096)  # build the cached data once, outside the timings
    print(
        f"model: tiny preset; batch {args.batch_size} x {args.seq_len} tokens; {args.steps} steps timed after "
        f"{args.warmup}; {args.precision}, AdamW, cosine; each variant in its own process, {args.rounds} "
        "interleaved round(s)"
    )
    print(machine_line())
    passthrough = [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch-size={args.batch_size}",
        f"--seq-len={args.seq_len}",
        f"--lr={args.lr}",
        f"--precision={args.precision}",
    ]
    passthrough += ["--smoke"] if args.smoke else []
    median = {v: r["tokens_per_s"] for v, r in run_variants(__file__, VARIANTS, passthrough, args.rounds).items()}
    anchor = median["hf"]
    print(f"\n| {'variant':<38} | tokens/s | vs HF Trainer |")
    print(f"|{'-' * 40}|----------|---------------|")
    for variant, name in VARIANTS.items():
        print(f"| {name:<38} | {median[variant]:8.0f} | {median[variant] / anchor:12.2f}x |")
    print(f"\nratio: {median['ours-compile'] / anchor:.2f}  (codex-ml loop with training.compile=true over the stock HF Trainer)")


if __name__ == "__main__":
    main()
