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
import platform
import statistics
import subprocess
import sys
import time

import torch


def prepared_windows(seq_len: int, smoke: bool):
    """The default job's tokenizer and packed data (cached after the first run)."""
    from codex_ml.conf.schema import DataConfig, TokenizerConfig
    from codex_ml.data.loader import TokenStream
    from codex_ml.data.pack import open_split
    from codex_ml.recipes.prepare import prepare_data

    data = DataConfig(seq_len=seq_len, num_workers=2)
    tok = TokenizerConfig(vocab_size=1024 if smoke else 4096)
    prepared = prepare_data(data, tok, log=lambda m: None)
    return prepared, TokenStream(open_split(prepared.directory, "train"))


def run_ours(model, stream, args, warmup: int, compile: bool) -> float:
    from codex_ml.data.loader import PackedBatches
    from codex_ml.recipes.models import _native_loss_sum
    from codex_ml.training.device import autocast_factory
    from codex_ml.training.loop import LoopSettings, Trainer
    from codex_ml.training.optim import build_optimizer, build_scheduler

    opt = build_optimizer(model, args.lr, 0.1, (0.9, 0.95), 1e-8, "cpu")
    sched = build_scheduler(opt, 10, args.steps, "cosine", 0.1)
    batches = PackedBatches(stream, args.seq_len, args.batch_size, seed=0)
    stamps = {}

    def emit(event):
        if event.get("event") == "train":
            stamps[event["step"]] = time.perf_counter()

    settings = LoopSettings(max_steps=args.steps, log_every=1, eval_every=0, checkpoint_every=10**9)
    loss_sum = _native_loss_sum(torch.compile(model) if compile else model)
    autocast = autocast_factory(torch.device("cpu"), args.precision)
    trainer = Trainer(model, loss_sum, opt, sched, batches, settings, torch.device("cpu"),
                      evaluate=lambda: {}, save=lambda s: None, emit=emit, autocast=autocast)
    trainer.run()
    return (args.steps - warmup) * args.batch_size * args.seq_len / (stamps[args.steps] - stamps[warmup])


def run_hf_trainer(model, stream, args, warmup: int, out_dir: str, compile: bool) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from codex_ml.data.loader import window_batch

    class Windows(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.n = (len(stream) - 1) // args.seq_len

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i):
            b = window_batch(stream, torch.tensor([i * args.seq_len]).numpy(), args.seq_len)
            # the Trainer's causal-LM convention: labels equal inputs, the model shifts them
            ids = torch.cat([b["input_ids"][0], b["labels"][0, -1:]])
            return {"input_ids": ids[:-1], "labels": ids[:-1]}

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps = {}

        def on_step_end(self, a, state, control, **kw):
            self.stamps[state.global_step] = time.perf_counter()

    clock = Clock()
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.1,
        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, torch_compile=compile,
        bf16=args.precision == "bf16",
    )
    Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[clock]).train()
    return (args.steps - warmup) * args.batch_size * args.seq_len / (clock.stamps[args.steps] - clock.stamps[warmup])


VARIANTS = {
    "hf": "HF Trainer",
    "hf-compile": "HF Trainer, torch_compile=True",
    "ours": "codex-ml loop",
    "ours-compile": "codex-ml loop, training.compile=true",
}


def measure(variant: str, args) -> float:
    """Tokens/s of one variant, in this process."""
    import tempfile

    from codex_ml.conf.schema import TrainConfig
    from codex_ml.models.convert import native_to_hf
    from codex_ml.models.gpt import GPT
    from codex_ml.recipes.models import native_config

    if variant.startswith("ours"):
        from codex_ml.runtime import tune_allocator

        tune_allocator()  # what `codex-ml` does at start-up
    prepared, stream = prepared_windows(args.seq_len, args.smoke)
    cfg = TrainConfig()
    cfg.model.max_seq_len = max(args.seq_len, 128)
    torch.manual_seed(0)
    native = GPT(native_config(cfg, len(prepared.tokenizer)))  # the same initial weights for every variant
    compile = variant.endswith("compile")
    if variant.startswith("ours"):
        return run_ours(native, stream, args, args.warmup, compile)
    with tempfile.TemporaryDirectory() as out:
        return run_hf_trainer(native_to_hf(native), stream, args, args.warmup, out, compile)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the same for every variant; auto: bf16 where the CPU computes it natively (AVX512-BF16, AMX)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats; the median counts")
    p.add_argument("--smoke", action="store_true", help="a few steps of a smaller batch")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = p.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.seq_len, args.rounds = 6, 2, 4, 32, 1
    if args.precision == "auto":
        args.precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.variant:
        print(json.dumps({"tokens_per_s": measure(args.variant, args)}))
        return

    prepared_windows(args.seq_len, args.smoke)  # build the cached data once, outside the timings
    print(f"model: tiny preset; batch {args.batch_size} x {args.seq_len} tokens; {args.steps} steps timed after "
          f"{args.warmup}; {args.precision}, AdamW, cosine; each variant in its own process, {args.rounds} interleaved round(s)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}")
    results = {v: [] for v in VARIANTS}
    passthrough = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch-size={args.batch_size}",
                   f"--seq-len={args.seq_len}", f"--lr={args.lr}", f"--precision={args.precision}"]
    passthrough += ["--smoke"] if args.smoke else []
    for _ in range(args.rounds):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, f"--variant={variant}", *passthrough],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])
    median = {v: statistics.median(r) for v, r in results.items()}
    anchor = median["hf"]
    print(f"\n| {'variant':<38} | tokens/s | vs HF Trainer |")
    print(f"|{'-' * 40}|----------|---------------|")
    for variant, name in VARIANTS.items():
        print(f"| {name:<38} | {median[variant]:8.0f} | {median[variant] / anchor:12.2f}x |")
    print(f"\nratio: {median['ours-compile'] / anchor:.2f}  (codex-ml loop with training.compile=true over the stock HF Trainer)")


if __name__ == "__main__":
    main()
