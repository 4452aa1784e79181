"""Padding-free packing for fine-tuning: effective tokens/s of padded rows vs packed rows, in one run.

Supervised fine-tuning examples have very different lengths. With one example per row, most of a
row is padding that the model computes anyway; packing puts several examples in a row and keeps
them apart with a block-diagonal causal mask, so a row is mostly real tokens. This script builds
examples whose lengths follow a long-tailed (log-normal) distribution, lays them out three ways and
trains the native model on each with AdamW for the same number of steps:

  - padded: one example per row, a dense causal + padding mask (what an unpacked SFT run does);
  - packed, dense mask: first-fit-decreasing packing (``data.pack=true``), a (T x T) boolean mask
    through ``scaled_dot_product_attention``;
  - packed, FlexAttention: the same rows with a block-sparse mask built from the example ids
    (``model.attention=flex``): masked blocks are skipped, not computed. GPU only: FlexAttention
    has no backward pass on CPU.

The figure that matters is *effective* tokens/s: real (non-padding) tokens trained per second.
The table also shows the share of padding and peak memory. The ratio printed last is the best
packed variant's effective tokens/s over the padded one's.

GPU defaults: the `base` shape with a 4096-token context (long sequences), bf16, compiled.
CPU defaults: the `tiny` shape with a 512-token context, compiled (``--eager`` to skip). Peak memory is
reported on GPU only (a process's resident peak on CPU would mix the variants).

    python benchmarks/packed_sft.py            # about two minutes on 2 cores
    python benchmarks/packed_sft.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import auto_precision, machine_line, peak_memory_mb


def examples(n: int, seq_len: int, vocab: int, seed: int):
    """Examples with log-normal lengths (median about a tenth of the context), prompt tokens untrained."""
    from codex_ml.data.sft import Example

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(seq_len / 10), 0.8, n).astype(int), 8, seq_len + 1)
    out = []
    for i, length in enumerate(lengths):
        ids = rng.integers(3, vocab, length).tolist()
        prompt = length // 3
        out.append(Example(f"ex{i}", ids, [False] * prompt + [True] * (length - prompt)))
    return out


def build_model(args, device):
    from codex_ml.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    if args.base:
        cfg = GPTConfig(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=2048, max_seq_len=args.seq_len)
    else:
        cfg = GPTConfig(vocab_size=4096, n_layer=4, n_head=6, n_kv_head=6, d_model=192, d_ff=512, max_seq_len=args.seq_len)
    return GPT(cfg).to(device)


def measure(name: str, rows, flex: bool, args, device, precision: str) -> dict:
    from codex_ml.data.rows import row_batch
    from codex_ml.recipes.models import native_loss_sum
    from codex_ml.training.device import autocast_factory

    model = build_model(args, device)
    module = torch.compile(model) if args.compile else model
    loss_sum = native_loss_sum(module)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = autocast_factory(device, precision)
    order = np.random.default_rng(0).permutation(len(rows))
    steps = args.warmup + args.steps
    if len(rows) < steps * args.batch:
        order = np.resize(order, steps * args.batch)
    real = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, real = time.perf_counter(), 0
        index = order[step * args.batch : (step + 1) * args.batch]
        batch = {k: v.to(device, non_blocking=True) for k, v in row_batch(rows, index, True, flex).items()}
        with autocast():
            total = loss_sum(batch)
        targets = (batch["labels"] != -100).sum()
        (total / targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += int((rows.segments[index] >= 0).sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    padding = float((rows.segments < 0).mean())
    peak = peak_memory_mb(device) if device.type == "cuda" else float("nan")  # RSS is per process, not per variant
    del model, module, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"name": name, "eff": real / seconds, "padding": padding, "rows": len(rows), "peak": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="rows per step")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="do not torch.compile the model")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.base = device.type == "cuda" and not args.smoke
    args.seq_len = args.seq_len or (4096 if args.base else 512 if not args.smoke else 128)
    args.batch = args.batch or (8 if args.base else 8 if not args.smoke else 2)
    args.steps = args.steps or (30 if not args.smoke else 2)
    if args.smoke:
        args.examples, args.warmup = 200, 1
    args.compile = not (args.eager or args.smoke)
    precision = auto_precision("auto")

    from codex_ml.data.rows import pack_examples

    data = examples(args.examples, args.seq_len, 4096, seed=0)
    padded = pack_examples(data, args.seq_len, pad_id=0, pack=False)
    packed = pack_examples(data, args.seq_len, pad_id=0, pack=True)
    print(
        f"model: {'base' if args.base else 'tiny'} shape, context {args.seq_len}, {args.batch} rows per step, "
        f"{precision}, {'compiled' if args.compile else 'eager'}; {len(data)} examples "
        f"(median {int(np.median([len(e.ids) for e in data]))} tokens); {args.steps} timed steps after "
        f"{args.warmup} warm-up"
    )
    print(machine_line())
    results = [
        measure("padded, one example per row", padded, False, args, device, precision),
        measure("packed, dense mask (sdpa)", packed, False, args, device, precision),
    ]
    if device.type == "cuda":
        results.append(measure("packed, FlexAttention block mask", packed, True, args, device, precision))
    else:
        print("(packed, FlexAttention: GPU only; FlexAttention has no backward pass on CPU)")
    anchor = results[0]["eff"]
    print(f"\n| {'variant':<34} | rows | padding | effective tokens/s | peak MB | vs padded |")
    print(f"|{'-' * 36}|------|---------|--------------------|---------|-----------|")
    for r in results:
        peak = f"{r['peak']:7.0f}" if r["peak"] == r["peak"] else "    n/a"
        print(
            f"| {r['name']:<34} | {r['rows']:4d} | {r['padding']:6.1%} | {r['eff']:18.0f} | {peak} | {r['eff'] / anchor:8.2f}x |"
        )
    best = max(results[1:], key=lambda r: r["eff"])
    print(f"\nratio: {best['eff'] / anchor:.2f}  ({best['name']} over padded rows, effective tokens/s)")


if __name__ == "__main__":
    main()
