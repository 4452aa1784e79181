"""DPO through codex-ml vs TRL's DPOTrainer on the same model and pairs, in one run.

The model is a Llama checkpoint of the tiny preset's shape (vocabulary 4096) saved with
``save_pretrained``; the pairs are small Python functions, the correct body chosen and a broken
one rejected. Both sides train the full model against a frozen copy of the starting weights
(beta 0.1, the sigmoid loss), with AdamW, the same batch of pairs, learning rate and precision.
codex-ml runs `codex-ml dpo`'s own path (``train(cfg, task=DPOTask)``: the checkpoint loaded
exactly into the native decoder, our loop, run folder and all); TRL runs ``DPOTrainer`` as its
documentation shows. Each side runs in its own process (rounds interleaved, medians).

Both sides see the same pairs in the same number of steps, so tokens/s is the steps timed (after
a warm-up) times the pairs per step times the mean tokens of a pair (chosen + rejected sequences,
prompt included, as tokenized by codex-ml), over the time they took: the ratio printed last is
codex-ml's over TRL's.

    python benchmarks/dpo.py            # a few minutes on 2 cores
    python benchmarks/dpo.py --smoke    # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from common import auto_precision, machine_line, peak_memory_mb, prepared_windows, run_variants, step_clock
from finetune import save_base_model

VARIANTS = {"trl": "TRL DPOTrainer", "codex-ml": "codex-ml dpo"}
OPS = [("add", "+", "plus"), ("sub", "-", "minus"), ("mul", "*", "times"), ("mod", "%", "modulo")]


def preference_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        name, op, word = OPS[i % 4]
        k = 2 + i // 4
        prompt = f'def {name}_{k}(x, y):\n    """Return x {word} {k}, then y added."""\n'
        broken = [f"    retrun x {op} {k} + y\n", f"    return x {op} + y\n", f"    return (x {op} {k} + y\n"][i % 3]
        rows.append({"prompt": prompt, "chosen": f"    z = x {op} {k}\n    return z + y\n", "rejected": broken})
    return rows


def mean_pair_tokens(model_dir: Path, rows: list[dict]) -> float:
    from codex_ml.data.preferences import PairEncoder, check_record

    encoder = PairEncoder(model_dir)
    pairs = [encoder.encode(check_record(f"pairs:{i}", r)) for i, r in enumerate(rows)]
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / len(pairs)


def run_trl(model_dir: Path, prefs: Path, args, device: torch.device) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    clock = step_clock()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            beta=0.1,
            loss_type=["sigmoid"],
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            max_length=args.seq_len,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=device.type == "cpu",
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            bf16=args.precision == "bf16",
        )
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        DPOTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[clock]
        ).train()
    s = clock.stamps
    return (args.steps - args.warmup) * args.batch_size * args.pair_tokens / (s[args.steps] - s[args.warmup])


def run_codex_ml(model_dir: Path, prefs: Path, args, device: torch.device) -> float:
    from codex_ml.conf.schema import DPOCommandConfig, validate_dpo
    from codex_ml.recipes.dpo import DPOTask
    from codex_ml.recipes.train import train
    from codex_ml.runtime import tune_allocator

    tune_allocator()  # what `codex-ml` does at start-up
    cfg = DPOCommandConfig()
    cfg.model.kind, cfg.model.path, cfg.model.device = "hf", str(model_dir), device.type
    cfg.data.source, cfg.data.paths, cfg.data.seq_len, cfg.data.val_fraction = "sft", [str(prefs)], args.seq_len, 0.02
    cfg.tracking.mlflow = False
    t = cfg.training
    t.max_steps, t.batch_size, t.lr, t.warmup_steps, t.weight_decay, t.beta2 = args.steps, args.batch_size, args.lr, 0, 0.1, 0.95
    t.precision, t.log_every, t.eval_every, t.checkpoint_every, t.sample_tokens = args.precision, 1, 0, 10**6, 0
    with tempfile.TemporaryDirectory() as out:
        cfg.run.dir = str(Path(out) / "run")
        validate_dpo(cfg)
        train(cfg, task=DPOTask(cfg.dpo))
        # each train event is stamped as it leaves the loop; log_every=1: one read-back per step, as TRL's loop
        events = [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.ndjson").read_text().splitlines()]
        stamps = {e["step"]: e["time"] for e in events if e.get("event") == "train"}
    return (args.steps - args.warmup) * args.batch_size * args.pair_tokens / (stamps[args.steps] - stamps[args.warmup])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--prefs", help=argparse.SUPPRESS)
    p.add_argument("--pair-tokens", type=float, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.pairs, args.rounds = 6, 2, 4, 48, 1
    args.precision = auto_precision(args.precision)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.variant:
        run = run_codex_ml if args.variant == "codex-ml" else run_trl
        tps = run(Path(args.model_dir), Path(args.prefs), args, device)
        print(json.dumps({"tokens_per_s": tps, "peak_memory_mb": peak_memory_mb(device)}))
        return

    prepared, _ = prepared_windows(64, 1024 if args.smoke else 4096)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prefs = Path(tmp) / "llama", Path(tmp) / "prefs.jsonl"
        save_base_model(model_dir, prepared.tokenizer_dir, len(prepared.tokenizer), max(args.seq_len, 128))
        rows = preference_rows(args.pairs)
        prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        pair_tokens = mean_pair_tokens(model_dir, rows)
        print(
            f"model: Llama checkpoint of the tiny preset's shape, full fine-tuning against a frozen copy; beta 0.1, sigmoid; "
            f"{args.batch_size} pairs per step ({pair_tokens:.0f} tokens a pair); {args.steps} steps, timed after {args.warmup}; "
            f"{args.precision}; {args.rounds} interleaved round(s), each side in its own process"
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
            f"--prefs={prefs}",
            f"--pair-tokens={pair_tokens}",
        ] + (["--smoke"] if args.smoke else [])
        res = run_variants(__file__, VARIANTS, passthrough, args.rounds)
    anchor = res["trl"]["tokens_per_s"]
    print(f"\n| {'variant':<24} | tokens/s | peak memory (MB) | vs TRL |")
    print(f"|{'-' * 26}|----------|------------------|--------|")
    for variant, name in VARIANTS.items():
        r = res[variant]
        print(f"| {name:<24} | {r['tokens_per_s']:8.0f} | {r['peak_memory_mb']:16.0f} | {r['tokens_per_s'] / anchor:5.2f}x |")
    print(f"\nratio: {res['codex-ml']['tokens_per_s'] / anchor:.2f}")


if __name__ == "__main__":
    main()
