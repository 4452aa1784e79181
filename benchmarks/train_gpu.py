"""Training throughput near the hardware limit: our loop vs the Hugging Face Trainer, one run, same shape.

On a GPU the shape is GPT-2-124M's (12 layers, 12 heads, width 768, vocab 50304, batch 32 x 1024,
bf16, fused AdamW), as in the issue's anchor table; every variant is measured in this run, in its
own process:

  - HF Trainer + GPT2LMHeadModel, defaults (bf16)
  - HF Trainer + GPT2LMHeadModel, torch_compile=True
  - codex-ml loop + native `base` model, compiled (training.compile=true, bf16, fused AdamW)
  - the same with activation checkpointing (its cost)
  - our loop on the `large` preset (~350M: 24 layers, width 1024) at batch 8 x 1024: does it fit
    one 80 GB GPU, at what speed (GPU only; a scaled-down shape under ``--smoke``)

Tokens are uniform random ids (throughput does not depend on their values). Each row reports
tokens/s, MFU against the device's peak (6N + 12·L·H·Q·T FLOPs per token, N without position
embeddings; 989 TFLOP/s for an H100's bf16) and peak memory. The ratio printed last is ours over the
compiled HF Trainer. On CPU it runs the same variants at the `tiny` shape (and is smoke-tested).

    python benchmarks/train_gpu.py              # on a GPU machine
    python benchmarks/train_gpu.py --smoke      # seconds, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from common import machine_line, peak_memory_mb, run_variants, step_clock

VARIANTS = {
    "hf": "HF Trainer, GPT2LMHeadModel, defaults",
    "hf-compile": "HF Trainer, torch_compile=True",
    "ours": "codex-ml loop, base, compiled",
    "ours-ckpt": "codex-ml loop, + activation checkpointing",
    "ours-large": "codex-ml loop, large preset, batch 8 x 1024",
}


def shape(args, variant: str = "") -> dict:
    large = variant == "ours-large"
    if args.smoke:
        return dict(n_layer=3 if large else 2, n_head=2, d_model=64, d_ff=192, vocab=512, batch=2 if large else 4, seq=64)
    if torch.cuda.is_available() and large:  # the `large` preset (conf/model/large.yaml)
        return dict(n_layer=24, n_head=16, d_model=1024, d_ff=2816, vocab=50304, batch=8, seq=1024)
    if torch.cuda.is_available():
        return dict(n_layer=12, n_head=12, d_model=768, d_ff=2048, vocab=50304, batch=32, seq=1024)
    return dict(n_layer=4, n_head=6, d_model=192, d_ff=512, vocab=4096, batch=32, seq=128)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int, n: int = 100_000) -> None:
        self.vocab, self.seq, self.n = vocab, seq, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        ids = torch.randint(0, self.vocab, (self.seq,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class RandomBatches:
    """Our loader's interface over random tokens: endless, pinned for asynchronous copies."""

    def __init__(self, vocab: int, seq: int, batch: int, pin: bool) -> None:
        self.vocab, self.seq, self.batch, self.pin, self.i = vocab, seq, batch, pin, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        rows = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=torch.Generator().manual_seed(self.i))
        batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch


def measure(variant: str, args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = shape(args, variant)
    steps, warmup = args.steps, args.warmup
    tokens = s["batch"] * s["seq"]
    if variant.startswith("hf"):
        from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=s["vocab"], n_embd=s["d_model"], n_layer=s["n_layer"], n_head=s["n_head"], n_positions=s["seq"])
        )
        clock = step_clock()
        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=s["batch"],
                max_steps=steps,
                learning_rate=6e-4,
                bf16=args.bf16,
                save_strategy="no",
                report_to=[],
                logging_steps=50,
                disable_tqdm=True,
                use_cpu=device.type == "cpu",
                torch_compile=variant == "hf-compile",
                optim="adamw_torch_fused",
            )
            Trainer(model=model, args=targs, train_dataset=RandomTokens(s["vocab"], s["seq"]), callbacks=[clock]).train()
        elapsed = clock.stamps[steps] - clock.stamps[warmup]
        n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
        flops = 6 * n + 12 * s["n_layer"] * s["d_model"] * s["seq"]
    else:
        import time

        from codex_ml.models.gpt import GPT, GPTConfig
        from codex_ml.recipes.models import native_loss_sum
        from codex_ml.runtime import tune_allocator
        from codex_ml.training.device import autocast_factory
        from codex_ml.training.loop import LoopSettings, Trainer
        from codex_ml.training.optim import build_optimizer, build_scheduler

        tune_allocator()
        # SwiGLU's d_ff (2048 at width 768) gives the parameters of GPT-2's 4x GELU MLP
        model = GPT(
            GPTConfig(
                vocab_size=s["vocab"],
                n_layer=s["n_layer"],
                n_head=s["n_head"],
                n_kv_head=s["n_head"],
                d_model=s["d_model"],
                d_ff=s["d_ff"],
                max_seq_len=s["seq"],
                tie_embeddings=True,
            )
        ).to(device)
        model.gradient_checkpointing = variant == "ours-ckpt"
        opt = build_optimizer(model, 6e-4, 0.1, (0.9, 0.95), 1e-8, device.type)
        sched = build_scheduler(opt, 10, steps, "cosine", 0.1)
        stamps = {}

        def emit(e):
            if e.get("event") == "train":
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stamps[e["step"]] = time.perf_counter()

        loss_sum = native_loss_sum(torch.compile(model), fused=device.type != "cuda")
        Trainer(
            model,
            loss_sum,
            opt,
            sched,
            RandomBatches(s["vocab"], s["seq"], s["batch"], device.type == "cuda"),
            LoopSettings(max_steps=steps, log_every=1, checkpoint_every=10**9),
            device,
            evaluate=lambda **_: {},
            save=lambda st: None,
            emit=emit,
            autocast=autocast_factory(device, "bf16" if args.bf16 else "fp32"),
        ).run()
        elapsed = stamps[steps] - stamps[warmup]
        flops = model.flops_per_token(s["seq"])
    tps = (steps - warmup) * tokens / elapsed
    from codex_ml.training.device import peak_flops

    peak = peak_flops(device, "bf16" if args.bf16 else "fp32")
    return {"tokens_per_s": tps, "mfu": tps * flops / peak if peak else float("nan"), "peak_memory_mb": peak_memory_mb(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.warmup = 6, 2
    args.bf16 = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    s = shape(args)
    print(
        f"shape: {s['n_layer']} layers, {s['n_head']} heads, width {s['d_model']}, vocab {s['vocab']}, batch "
        f"{s['batch']} x {s['seq']}; {'bf16' if args.bf16 else 'fp32'}; {args.steps} steps timed after {args.warmup}"
    )
    print(machine_line())
    passthrough = [f"--steps={args.steps}", f"--warmup={args.warmup}"] + (["--smoke"] if args.smoke else [])
    variants = {
        v: name for v, name in VARIANTS.items() if v != "ours-large" or torch.cuda.is_available() or args.smoke
    }  # 350M params: GPU only
    res = run_variants(__file__, variants, passthrough, args.rounds)
    anchor = res["hf-compile"]["tokens_per_s"]
    print(f"\n| {'variant':<42} | tokens/s | MFU    | peak memory (MB) | vs compiled HF |")
    print(f"|{'-' * 44}|----------|--------|------------------|----------------|")
    for v, name in variants.items():
        r = res[v]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] == r["mfu"] else "n/a"
        vs = f"{r['tokens_per_s'] / anchor:13.2f}x" if v != "ours-large" else f"{'(other shape)':>14}"
        print(f"| {name:<42} | {r['tokens_per_s']:8.0f} | {mfu:>6} | {r['peak_memory_mb']:16.0f} | {vs} |")
    print(f"\nratio: {res['ours']['tokens_per_s'] / anchor:.2f}  (codex-ml compiled over HF Trainer with torch_compile=True)")


if __name__ == "__main__":
    main()
