"""What the training benchmarks share: data, timed runs of both loops, child processes, the table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def auto_precision(choice: str) -> str:
    """bf16 where the CPU computes it natively (AVX512-BF16, AMX) or on CUDA; else fp32."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def prepared_windows(seq_len: int, vocab_size: int):
    """The default job's tokenizer and packed standard-library data (cached after the first run)."""
    from codex_ml.conf.schema import DataConfig, TokenizerConfig
    from codex_ml.data.loader import TokenStream
    from codex_ml.data.pack import open_split
    from codex_ml.recipes.prepare import prepare_data

    prepared = prepare_data(
        DataConfig(seq_len=seq_len, num_workers=2), TokenizerConfig(vocab_size=vocab_size), log=lambda m: None
    )
    return prepared, TokenStream(open_split(prepared.directory, "train"))


class WindowDataset(torch.utils.data.Dataset):
    """The same windows as our loader, in the Trainer's format (labels equal inputs; the model shifts)."""

    def __init__(self, stream, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len
        self.n = (len(stream) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        ids = torch.from_numpy(self.stream.slice(i * self.seq_len, i * self.seq_len + self.seq_len).astype("int64"))
        return {"input_ids": ids, "labels": ids}


def step_clock():
    """A TrainerCallback recording when each optimizer step ended."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps = {}

        def on_step_end(self, args, state, control, **kw):
            self.stamps[state.global_step] = time.perf_counter()

    return Clock()


def run_our_loop(
    module,
    loss_sum,
    stream,
    steps: int,
    warmup: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    precision: str,
    device: torch.device,
) -> float:
    """Tokens/s of codex-ml's loop on ``module`` after ``warmup`` steps."""
    from codex_ml.data.loader import PackedBatches
    from codex_ml.training.device import autocast_factory
    from codex_ml.training.loop import LoopSettings, Trainer
    from codex_ml.training.optim import build_optimizer, build_scheduler

    opt = build_optimizer(module, lr, 0.1, (0.9, 0.95), 1e-8, device.type)
    sched = build_scheduler(opt, 10, steps, "cosine", 0.1)
    stamps = {}

    def emit(event):
        if event.get("event") == "train":
            stamps[event["step"]] = time.perf_counter()

    settings = LoopSettings(max_steps=steps, log_every=1, eval_every=0, checkpoint_every=10**9)
    Trainer(
        module,
        loss_sum,
        opt,
        sched,
        PackedBatches(stream, seq_len, batch_size, seed=0),
        settings,
        device,
        evaluate=lambda **_: {},
        save=lambda s: None,
        emit=emit,
        autocast=autocast_factory(device, precision),
    ).run()
    return (steps - warmup) * batch_size * seq_len / (stamps[steps] - stamps[warmup])


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variants(script: str, variants: dict[str, str], passthrough: list[str], rounds: int) -> dict[str, dict]:
    """Run each variant in its own process, interleaved ``rounds`` times; medians of what each printed."""
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            out = subprocess.run(
                [sys.executable, script, f"--variant={variant}", *passthrough], capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                sys.exit(f"{variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {v: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for v, runs in results.items()}


def machine_line() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or platform.machine())
    return (
        f"machine: {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}"
    )
