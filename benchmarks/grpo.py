"""GRPO speed: TRL's GRPOTrainer (HF generate) vs `codex-ml grpo` (our KV-cache decoder), same everything, one run.

The same tiny Llama, toy problems, group size, completion length, steps and reward function (execution in
codex-ml's sandbox, called with TRL's convention). Prints steps/s and generated tokens/s of each; the last
line is ``ratio: X`` (ours / TRL, steps per second). Usage: python benchmarks/grpo.py [--steps N] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_model(root: Path, layers: int, width: int) -> Path:
    """A seeded Llama with codex-ml's tokenizer trained on a little of the standard library."""
    import sysconfig

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    subprocess.run(
        [sys.executable, "-m", "codex_ml.cli", "tokenizer", "data.source=files", f"data.paths=[{stdlib / 'json'}]",
         "data.num_workers=0", "tokenizer.vocab_size=1024", f"out={root / 'tok'}"],
        check=True, capture_output=True,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=width * 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    return model_dir


def toy_problems(path: Path) -> list[dict]:
    rows = []
    for k in range(1, 9):
        for name, op in (("add", "+"), ("times", "*")):
            rows.append(
                {
                    "task_id": f"Toy/{name}_{k}",
                    "prompt": f'def {name}_{k}(x):\n    """Return x {op} {k}."""\n',
                    "test": f"def check(candidate):\n    assert candidate(3) == 3 {op} {k}\n",
                    "entry_point": f"{name}_{k}",
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_trl(model_dir: Path, problems: list[dict], a: argparse.Namespace, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from codex_ml.eval.sandbox import Sandbox
    from codex_ml.rl.rewards import execution

    generated = [0]
    with Sandbox(workers=min(os.cpu_count() or 1, a.batch)) as box:
        judge = execution.bind(box, timeout=3.0)

        def execution_reward(prompts, completions, completion_ids, test, entry_point, **_):
            generated[0] += sum(len(ids) for ids in completion_ids)
            scores = judge(prompts=prompts, completions=completions, test=test, entry_point=entry_point)
            return scores

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
        config = GRPOConfig(
            output_dir=str(out / "trl"), per_device_train_batch_size=a.batch, num_generations=a.group,
            max_completion_length=a.tokens, max_steps=a.steps, learning_rate=1e-5, logging_steps=1, report_to=[],
            save_strategy="no", use_cpu=True, beta=0.0, temperature=1.0, seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        data = Dataset.from_list([{"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]} for p in problems])
        trainer = GRPOTrainer(model=model, reward_funcs=execution_reward, args=config, train_dataset=data, processing_class=tok)
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "tokens": generated[0]}


def run_ours(model_dir: Path, problems_path: Path, a: argparse.Namespace, out: Path) -> dict:
    run = out / "ours"
    subprocess.run(
        [sys.executable, "-m", "codex_ml.cli", "grpo", "model=hf", f"model.path={model_dir}", f"data.paths=[{problems_path}]",
         f"run.dir={run}", f"grpo.group_size={a.group}", f"training.batch_size={a.batch}", f"grpo.max_new_tokens={a.tokens}",
         f"training.max_steps={a.steps}", "grpo.stop=[]", "grpo.beta=0.0", "training.lr=1e-5", "tracking.mlflow=false",
         "training.checkpoint_every=100000", "model.device=cpu"],
        check=True, capture_output=True,
    )  # fmt: skip
    events = [json.loads(line) for line in (run / "metrics.ndjson").read_text().splitlines()]
    # the loop's own span, from its start event to its end event: no interpreter start-up, like trainer.train()
    start = next(e["time"] for e in events if e.get("event") == "start")
    end = next(e["time"] for e in events if e.get("event") == "end")
    tokens = sum(e["completions/mean_length"] * a.batch for e in events if e.get("event") == "train")
    return {"seconds": end - start, "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="tiny shapes: 2 steps, a 2-layer model, 16 new tokens")
    a = p.parse_args()
    if a.smoke:
        a.steps, a.tokens = 2, 16
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_model(root, 2 if a.smoke else 4, 64 if a.smoke else 128)
        problems = toy_problems(root / "problems.jsonl")
        ours = run_ours(model_dir, root / "problems.jsonl", a, root)
        trl = run_trl(model_dir, problems, a, root)
    print(f"GRPO on CPU: {a.steps} steps, {a.batch} completions per step (group {a.group}), up to {a.tokens} new tokens")
    print("| engine | steps/s | generated tokens/s | vs TRL |")
    print("|---|---|---|---|")
    for name, r in (("TRL GRPOTrainer", trl), ("codex-ml grpo", ours)):
        speed = f"{a.steps / r['seconds']:.3f} | {r['tokens'] / r['seconds']:.0f}"
        print(f"| {name} | {speed} | {trl['seconds'] / r['seconds']:.2f}x |")
    print(f"ratio: {trl['seconds'] / ours['seconds']:.2f}")


if __name__ == "__main__":
    main()
