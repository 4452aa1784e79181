"""Recipe: `codex-ml train`, from a corpus to a trained, checkpointed, resumable run.

It wires the components together: the prepared data, the model, the optimizer and schedule,
the loader, the native loop, checkpoints and the event log. Running it again on the same run
folder resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from omegaconf import OmegaConf

from codex_ml.conf.schema import ConfigError, TrainConfig
from codex_ml.data.loader import PackedBatches, TokenStream, eval_batches
from codex_ml.data.pack import open_split
from codex_ml.data.rows import RowBatches, eval_row_batches
from codex_ml.errors import CodexError
from codex_ml.eval.generate import SamplingSettings, generate
from codex_ml.eval.loss import evaluate_loss
from codex_ml.models.hf import DEFAULT_CONTEXT, check_model_dir
from codex_ml.models.loss import SummedLossModule, summed_token_loss
from codex_ml.recipes.models import ModelBundle, build_model, hf_forward, native_loss_sum
from codex_ml.recipes.prepare import PreparedData, PreparedRows, cache_root, prepare_data, prepare_sft
from codex_ml.repro import environment, rng_state, seed_everything, set_deterministic, set_rng_state
from codex_ml.runs import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    ENV_FILE,
    LOCK_FILE,
    METRICS_FILE,
    TOKENIZER_DIR,
    RunLock,
    resolve_run_dir,
)
from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.tracking.console import ConsoleReporter
from codex_ml.tracking.events import EventLog, NdjsonSink
from codex_ml.tracking.sinks import Trackers, start_trackers
from codex_ml.tracking.wandb_sink import require_wandb
from codex_ml.training.checkpoint import (
    OPTIMIZER_FILE,
    STATE_FILE,
    TrainingCheckpoints,
    latest_complete_checkpoint,
    load_training_state,
    prune_checkpoints,
    remove_partial,
    torch_bytes,
    verify_checkpoint,
)
from codex_ml.training.device import autocast_factory, configure_matmul_precision, peak_flops, resolve_device
from codex_ml.training.distributed import Distributed, init_distributed, resolve_strategy, wrap_ddp
from codex_ml.training.fsdp import no_gradient_sync, shard_model
from codex_ml.training.loop import LoopSettings, LoopState, StopRequest, Trainer, token_measure
from codex_ml.training.optim import build_optimizer, build_scheduler


def log(message: str) -> None:
    print(message, flush=True)


def run_dir_of(cfg: TrainConfig, sweep_job_dir: str | None = None) -> Path:
    return resolve_run_dir(cfg.run.root, cfg.run.name, cfg.run.dir, sweep_job_dir)


def model_tokenizer_dir(cfg: TrainConfig) -> Path | None:
    """The tokenizer that comes with ``model.path``: an HF model's own, or the native run's it continues."""
    if not cfg.model.path:
        return None
    path = Path(cfg.model.path).expanduser()
    if cfg.model.kind == "hf":
        check_model_dir(path)  # a missing or incomplete model directory fails before any data work
        return path
    for candidate in (path / TOKENIZER_DIR, path.parent.parent / TOKENIZER_DIR):  # a run folder, or one of its checkpoints
        if (candidate / "tokenizer.json").exists():
            return candidate
    raise ConfigError("model.path", f"{path} is neither a native run folder nor one of its checkpoints (no {TOKENIZER_DIR}/)")


def prepare_for_run(cfg: TrainConfig, run_dir: Path) -> PreparedData:
    """Data and tokenizer for a run; the run's own tokenizer once it has one, so resume never retrains it."""
    own = run_dir / TOKENIZER_DIR
    model_tokenizer = model_tokenizer_dir(cfg)
    tokenizer_dir = own if (own / "tokenizer.json").exists() else model_tokenizer
    prepared = prepare_data(cfg.data, cfg.tokenizer, tokenizer_dir=tokenizer_dir, log=log)
    if not (own / "tokenizer.json").exists():
        tmp = run_dir / f".tmp-{TOKENIZER_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(prepared.tokenizer_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt"))
        shutil.rmtree(own, ignore_errors=True)
        tmp.rename(own)
    return prepared


def write_config(cfg: TrainConfig, run_dir: Path) -> None:
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def dataset_record(prepared: PreparedData | PreparedRows) -> dict:
    """What env.json says of the data: its hash, where it is cached, its splits."""
    m = prepared.manifest
    return {"sha256": m["sha256"], "path": str(prepared.directory), "source": m["source"], "splits": m["splits"]}


def write_env(cfg: TrainConfig, run_dir: Path, dataset: dict, tokenizer: CodeTokenizer, extra: dict) -> dict:
    env = environment()
    env.update(
        {
            "seed": cfg.training.seed,
            "seeds": {
                "python": cfg.training.seed,
                "numpy": cfg.training.seed,
                "torch": cfg.training.seed,
                "data_order": cfg.training.seed,
            },
            "deterministic": cfg.training.deterministic,
            "dataset": dataset,
            "tokenizer": {"sha256": tokenizer.sha256(), "vocab_size": len(tokenizer)},
            "cache_dir": str(cache_root(cfg.data)),
            **extra,
        }
    )
    (run_dir / ENV_FILE).write_text(json.dumps(env, indent=2, default=str) + "\n")
    return env


def sft_tokenizer(cfg: TrainConfig, run_dir: Path) -> CodeTokenizer:
    """Fine-tuning records come with no corpus to train a tokenizer on: use the model's (or tokenizer.path)."""
    own = run_dir / TOKENIZER_DIR
    if not (own / "tokenizer.json").exists():
        source = model_tokenizer_dir(cfg) or (Path(cfg.tokenizer.path).expanduser() if cfg.tokenizer.path else None)
        if source is None:
            raise ConfigError(
                "model.path",
                "data.source=sft fine-tunes a model: set model.path (model=hf, or a native run to continue), or tokenizer.path",
            )
        tokenizer = CodeTokenizer.load(source)
        tmp = run_dir / f".tmp-{TOKENIZER_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt", "*.npy"))
        tmp.rename(own)
        del tokenizer
    return CodeTokenizer.load(own)


@dataclass
class TaskContext:
    """What a task may build its data, loss and validation on, once the model exists."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    dist: Distributed
    bundle: ModelBundle
    model: torch.nn.Module  # the bundle's module (LoRA-wrapped when asked): what the optimizer trains
    compiled: torch.nn.Module  # ``model`` or its torch.compile'd form: what forward passes run on
    autocast: Callable[[], contextlib.AbstractContextManager]
    tokenizer: CodeTokenizer
    data: Any  # what the task's ``prepare`` returned
    log: Callable[[str], None]
    # the model is sharded over the ranks (training.strategy=fsdp): every forward is a collective, so
    # every rank must run as many as the others (evaluation included; eval.loss's ``lockstep``)
    sharded: bool = False


@dataclass
class TaskParts:
    """A task's side of the loop: the same loop, checkpoints and tracking train every objective."""

    batches: Any  # an iterator of batches with state_dict()/load_state_dict() (position, sampler RNG)
    evaluate: Callable[..., dict]  # evaluate(whole_split=bool) -> validation metrics
    loss_module: torch.nn.Module  # module(batch) -> the objective summed over the batch's units; DDP wraps it
    dataset: dict  # what env.json records of the data
    measure: Callable[[dict], tuple[torch.Tensor, torch.Tensor]] = token_measure
    step_metrics: Callable[[], dict[str, torch.Tensor]] | None = None
    # a task with weights of its own (a reward model's scalar head): the optimizer trains
    # ``trainable`` instead of the bundle's module, and each checkpoint carries the task's files
    trainable: torch.nn.Module | None = None
    checkpoint_files: Callable[[], dict[str, bytes]] | None = None
    load_checkpoint: Callable[[Path], None] | None = None


class Task(Protocol):
    """An objective trained by the one loop: language modelling, a reward model, DPO, GRPO."""

    name: str
    hf_engine: bool  # whether training.engine=hf (the HF Trainer) can run it

    def prepare(self, cfg: TrainConfig, run_dir: Path, dist: Distributed) -> tuple[CodeTokenizer, Any]:
        """Before the model exists: the tokenizer (saved in the run folder) and the task's data."""
        ...

    def parts(self, ctx: TaskContext) -> TaskParts:
        """With the model: batches, the loss module and validation."""
        ...


class LanguageModelTask:
    """`codex-ml train`: next-token prediction on a packed corpus, or supervised fine-tuning rows."""

    name = "train"
    hf_engine = True

    def prepare(self, cfg: TrainConfig, run_dir: Path, dist: Distributed) -> tuple[CodeTokenizer, Any]:
        if cfg.data.source == "sft":
            tokenizer = sft_tokenizer(cfg, run_dir) if dist.is_main else None
            dist.barrier()
            return tokenizer or CodeTokenizer.load(run_dir / TOKENIZER_DIR), None
        prepared = prepare_for_run(cfg, run_dir) if dist.is_main else None
        dist.barrier()
        if prepared is None:
            prepared = prepare_data(cfg.data, cfg.tokenizer, tokenizer_dir=run_dir / TOKENIZER_DIR, log=lambda m: None)
        return prepared.tokenizer, prepared

    def parts(self, ctx: TaskContext) -> TaskParts:
        cfg, t, dist, bundle, device = ctx.cfg, ctx.cfg.training, ctx.dist, ctx.bundle, ctx.device
        seq_len = cfg.data.seq_len
        assert seq_len is not None  # resolved from the model before the parts are built
        if t.compile and device.type == "cuda" and bundle.native is not None:
            # compiled on GPU, logits and cross-entropy fuse inside the graph; the chunked loss is for eager and CPU
            loss_module = SummedLossModule(ctx.compiled, native_loss_sum(ctx.compiled, fused=False))
        elif ctx.sharded and bundle.native is None:
            # the fused loss calls a Hugging Face backbone directly, past the sharded root that gathers
            # the embeddings and head: under fsdp the whole model's forward runs, logits and all
            forward = hf_forward(ctx.compiled)
            loss_module = SummedLossModule(ctx.compiled, lambda batch: summed_token_loss(forward(batch), batch["labels"]))
        else:
            loss_module = SummedLossModule(ctx.compiled, bundle.loss_sum_with(ctx.compiled))
        batches: RowBatches | PackedBatches
        if cfg.data.source == "sft":
            if cfg.data.pack and not bundle.supports_packing:
                raise ConfigError(
                    "data.pack",
                    "packed rows restart attention at every example, which needs the native "
                    "decoder; this model trains as a Hugging Face module: set data.pack=false",
                )
            native_rows = bundle.native is not None
            rows = prepare_sft(
                cfg.data,
                ctx.tokenizer,
                ctx.run_dir / TOKENIZER_DIR,
                seq_len,
                cfg.tokenizer.truncation_side,
                log=ctx.log if dist.is_main else lambda m: None,
            )
            flex = native_rows and cfg.model.attention == "flex"
            batches = RowBatches(rows.train, t.batch_size, t.seed, native_rows, dist.rank, dist.world_size, flex=flex)
            val_rows = lambda bound: eval_row_batches(
                rows.val, t.batch_size, native_rows, bound, flex=flex, rank=dist.rank, world_size=dist.world_size
            )
            dataset = dataset_record(rows)
        else:
            prepared = ctx.data
            assert isinstance(prepared, PreparedData)  # prepared for a token corpus
            train_stream = TokenStream(open_split(prepared.directory, "train"))
            val_stream = TokenStream(open_split(prepared.directory, "val"))
            batches = PackedBatches(
                train_stream, seq_len, t.batch_size, t.seed, dist.rank, dist.world_size, pin_memory=device.type == "cuda"
            )
            val_rows = lambda bound: eval_batches(val_stream, seq_len, t.batch_size, bound, dist.rank, dist.world_size)
            dataset = dataset_record(prepared)
        model = ctx.model

        def evaluate(whole_split: bool = False) -> dict:
            """The validation loss on a fixed sample spread over the split (``training.eval_batches``
            batches per rank), or on all of it; ``val_tokens`` says how many target tokens it covers."""
            model.eval()
            m = evaluate_loss(
                bundle.forward_with(model),
                val_rows(0 if whole_split else t.eval_batches),
                device,
                ctx.autocast,
                dist.all_reduce_sum if dist.enabled else None,
                lockstep=ctx.sharded,
            )
            return {f"val_{k}": v for k, v in m.items()}

        return TaskParts(batches=batches, evaluate=evaluate, loss_module=loss_module, dataset=dataset)


def train(cfg: TrainConfig, sweep_job_dir: str | None = None, sweep: dict | None = None, task: Task | None = None) -> dict:
    """Train (or resume) the run ``cfg`` describes on ``task`` (language modelling unless another
    objective is given: the reward model, DPO, GRPO); returns the final evaluation metrics."""
    run_dir = run_dir_of(cfg, sweep_job_dir)
    device = resolve_device(cfg.model.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if cfg.tracking.wandb:
        require_wandb()  # before anything is written
    if cfg.model.attention == "flex" and device.type != "cuda":
        raise ConfigError(
            "model.attention",
            "flex trains on CUDA GPUs only (FlexAttention has no backward pass on "
            f"{device.type} in torch {torch.__version__}); use model.attention=sdpa",
        )
    existed = run_dir.exists()
    lock = RunLock(run_dir)
    if dist.is_main:
        lock.acquire()
    try:
        return _train_locked(cfg, run_dir, device, dist, sweep, task or LanguageModelTask())
    except CodexError:
        # a run refused before it wrote anything leaves no empty folder behind
        if dist.is_main and not existed and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE, f".tmp-{TOKENIZER_DIR}"}:
            lock.release()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        lock.release()


def _train_locked(
    cfg: TrainConfig, run_dir: Path, device: torch.device, dist: Distributed, sweep: dict | None, task: Task
) -> dict:
    t = cfg.training
    if t.engine == "hf" and not task.hf_engine:
        raise ConfigError("training.engine", f"codex-ml {task.name} runs on the native loop: set training.engine=native")
    ckpt_root = run_dir / CHECKPOINTS_DIR
    if dist.is_main:
        for p in remove_partial(ckpt_root):
            log(f"removed an interrupted checkpoint write: {p.name}")
    resume = latest_complete_checkpoint(ckpt_root)
    if resume is not None:
        verify_checkpoint(resume.path)  # refuses a corrupted checkpoint, naming the file
    if dist.is_main:
        log(f"run folder: {run_dir}" + (f" (resuming from {resume.path.name})" if resume else ""))

    set_deterministic(t.deterministic)
    configure_matmul_precision(device, t.precision)  # fp32 on CUDA: TF32 tensor cores, the rate MFU is measured at
    seed_everything(t.seed + dist.rank)
    tokenizer, task_data = task.prepare(cfg, run_dir, dist)

    strategy = resolve_strategy(t.strategy, dist)
    sharded = strategy == "fsdp" and dist.enabled  # one process under fsdp trains unsharded, checkpoints as DCP
    bundle = build_model(cfg, len(tokenizer), device, log=log, on_meta=sharded)
    if cfg.data.seq_len is None:
        cfg.data.seq_len = bundle.max_seq_len if cfg.model.kind == "native" else min(bundle.max_seq_len, DEFAULT_CONTEXT)
    if cfg.data.seq_len > bundle.max_seq_len:
        raise ConfigError("data.seq_len", f"{cfg.data.seq_len} exceeds the model's context of {bundle.max_seq_len}")
    model = bundle.module
    if sharded:
        # compiled per block (after activation checkpointing, before sharding), not as a whole
        compiled = shard_model(model, bundle.native, bundle.on_meta, device, t.precision, t.fsdp.reshard_after_forward, t.compile)
    else:
        # compiling a Module gives an OptimizedModule, a Module; the stubs say only Callable
        compiled = cast(torch.nn.Module, torch.compile(model)) if t.compile else model
    autocast = autocast_factory(device, t.precision)
    ctx = TaskContext(cfg, run_dir, device, dist, bundle, model, compiled, autocast, tokenizer, task_data, log, sharded)
    parts = task.parts(ctx)
    model_loss, batches, evaluate = parts.loss_module, parts.batches, parts.evaluate
    if strategy == "fsdp" and (parts.trainable is not None or parts.checkpoint_files is not None):
        raise ConfigError(
            "training.strategy",
            f"codex-ml {task.name} trains weights of its own besides the model, which fsdp does not shard: "
            "use training.strategy=ddp",
        )
    # DDP wraps the loss, not the bare model, so that every forward (the fused loss calls the backbone
    # itself) runs inside DDP.forward and the reducer synchronises the gradients (the HF Trainer wraps
    # model_loss for itself); under fsdp the model's own units synchronise them
    train_model = wrap_ddp(model_loss, dist, device) if t.engine == "native" and strategy == "ddp" else model_loss
    no_sync = partial(no_gradient_sync, model) if sharded else getattr(train_model, "no_sync", contextlib.nullcontext)

    optimizer = build_optimizer(parts.trainable or model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, device.type)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.max_steps, t.schedule, t.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None

    settings = LoopSettings(
        max_steps=t.max_steps,
        grad_accum=t.grad_accum,
        grad_clip=t.grad_clip,
        log_every=t.log_every,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
        best_metric=t.best_metric,
        best_mode=t.best_mode,
        early_stopping_patience=t.early_stopping_patience,
        early_stopping_min_delta=t.early_stopping_min_delta,
        flops_per_token=bundle.flops_per_token(cfg.data.seq_len),
        peak_flops=peak_flops(device, t.precision) * dist.world_size,
    )
    stop = StopRequest(agree=dist.agree_on_signal)  # a signal to one rank stops every rank, at the same step

    metrics_offset = None
    resumed_state = None
    if resume is not None:
        resumed_state = load_training_state(resume.path, model, optimizer, bundle.load_checkpoint)
        if parts.load_checkpoint is not None:
            parts.load_checkpoint(resume.path)
        saved = resumed_state["loader"]
        if len(saved) != dist.world_size and dist.is_main:
            log(
                f"{resume.path.name} was written by {len(saved)} rank(s), this run has {dist.world_size}: "
                "the loader continues at the same global sample"
            )
        # the same world size: each rank its own position; another: every loader continues from the
        # global position (rank 0's state says it in global terms), or refuses to if it cannot
        batches.load_state_dict(saved[dist.rank] if len(saved) == dist.world_size else saved[0])
        metrics_offset = resumed_state["metrics_offset"]

    events: EventLog | None = None  # rank 0's only
    trackers: Trackers | None = None
    if dist.is_main:
        write_config(cfg, run_dir)
        env = write_env(
            cfg,
            run_dir,
            parts.dataset,
            tokenizer,
            {
                "device": str(device),
                "world_size": dist.world_size,
                "strategy": strategy,
                "model": bundle.describe,
                "parameters": bundle.parameter_counts(),
                "resumed_from": str(resume.path) if resume else None,
            },
        )
        events = EventLog(NdjsonSink(run_dir / METRICS_FILE, truncate_to=metrics_offset))
        trackers = start_trackers(cfg, run_dir, events, env, sweep, current_step=lambda: trainer.state.step, log=log)

    console = ConsoleReporter(resume.step if resume else 0, t.max_steps, t.log_every)

    def emit(event: dict) -> None:
        if dist.is_main:
            assert events is not None
            console(event)
            events.log(event)

    trainer: Trainer
    checkpoints = TrainingCheckpoints(
        ckpt_root,
        dist.rank,
        dist.world_size,
        sharded=strategy == "fsdp",
        asynchronous=t.async_checkpoint,
        prune=lambda root: prune_checkpoints(root, t.keep_last, t.keep_best, t.best_metric, t.best_mode),
    )

    def save(state: LoopState) -> None:
        # every rank's own position and random streams (each rank was seeded seed + rank)
        loader_states = dist.gather_objects(batches.state_dict())
        rng_states = dist.gather_objects(rng_state())
        if dist.is_main:
            assert events is not None
            events.flush()

        def run_files() -> dict[str, bytes]:
            """Rank 0's files: under fsdp the weights and optimizer are every rank's DCP shards instead."""
            assert events is not None  # called on rank 0 only
            if strategy == "fsdp":
                files = bundle.config_files()
            else:
                files = bundle.checkpoint_files()
                if parts.checkpoint_files is not None:
                    files.update(parts.checkpoint_files())
                files[OPTIMIZER_FILE] = torch_bytes(optimizer.state_dict())
            files[STATE_FILE] = torch_bytes(
                {
                    "trainer": trainer.state_dict(),
                    "loader": loader_states,
                    "rng": rng_states,
                    "metrics_offset": events.primary.size(),
                    "world_size": dist.world_size,
                }
            )
            return files

        # a checkpoint carries the metrics of an evaluation at its own step only (for best-k)
        fresh = state.last_eval_step == state.step
        metrics = {k: v for k, v in state.last_metrics.items() if fresh and isinstance(v, (int, float))}
        extra = {"tokens": state.tokens, "time": time.time(), "world_size": dist.world_size, "strategy": strategy}
        written = checkpoints.save(state.step, model, optimizer, run_files, metrics, extra)
        path = written.pop("path")
        emit({"event": "checkpoint", "step": state.step, "path": str(path.relative_to(run_dir)), **written})

    trainer = Trainer(
        train_model,
        train_model,
        optimizer,
        scheduler,
        batches,
        settings,
        device,
        evaluate,
        save,
        emit,
        autocast=autocast,
        scaler=scaler,
        all_reduce=dist.all_reduce_sum if dist.enabled else None,
        no_sync=no_sync,
        stop=stop,
        world_size=dist.world_size,
        measure=parts.measure,
        step_metrics=parts.step_metrics,
    )
    if resumed_state is not None:
        trainer.load_state_dict(resumed_state["trainer"])
        rng = resumed_state["rng"]
        # a checkpoint written before RNG states were kept per rank holds one (the only rank's). A rank
        # the writing job had takes up its stream; a rank it lacked keeps its own seed (seed + rank)
        # advanced by the step, so that it draws neither another rank's numbers nor its first ones again
        rng = rng if isinstance(rng, list) else [rng]
        if dist.rank < len(rng):
            set_rng_state(rng[dist.rank])
        else:
            seed_everything(t.seed + dist.rank + 1_000_003 * trainer.state.step)
    start_step = trainer.state.step
    if dist.is_main:
        assert events is not None
        counts = bundle.parameter_counts()
        log(
            f"model: {bundle.describe}; {counts['total']:,} parameters, {counts['trainable']:,} trainable; "
            f"device {device}, precision {t.precision}"
        )
        events.log(
            {
                "event": "start",
                "step": start_step,
                "resumed": resume is not None,
                "device": str(device),
                "parameters": counts["total"],
                "trainable_parameters": counts["trainable"],
            }
        )

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if start_step < t.max_steps and t.engine == "hf":
            from codex_ml.training.hf_trainer import run_hf_trainer

            state = run_hf_trainer(
                compiled,
                cast(SummedLossModule, model_loss).loss_sum,
                optimizer,
                scheduler,
                batches,
                settings,
                trainer.state,
                t.batch_size,
                t.precision,
                t.seed,
                device,
                evaluate,
                save,
                emit,
                stop,
                all_reduce=dist.all_reduce_sum if dist.enabled else None,
            )
        elif start_step < t.max_steps:
            state = trainer.run()
        else:
            state = trainer.state
            log(f"the run already reached training.max_steps={t.max_steps}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        console.close()
        checkpoints.finish()  # a checkpoint still being written in the background completes first

    result = dict(state.last_metrics)
    if dist.is_main:
        assert events is not None and trackers is not None
        if stop.agreed is not None:  # this rank's signal, or another's
            name = signal.Signals(stop.agreed).name
            log(f"stopped by {name} at step {state.step}; the checkpoint is saved: run the same command to resume")
            events.log({"event": "interrupted", "step": state.step, "signal": name})
        else:
            if not sharded:  # a sharded model generates only with every rank taking part
                _print_sample(cfg, bundle, tokenizer)
            events.log({"event": "end", "step": state.step})
            if "val_loss" in result and "val_ppl" not in result:  # an objective other than language modelling
                figures = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("val_") and isinstance(v, float))
                log(f"final {figures} at step {state.step}; run folder {run_dir}")
            elif "val_loss" in result:
                log(
                    f"final val_loss {result['val_loss']:.4f} (perplexity {result['val_ppl']:.2f}) at step {state.step} "
                    f"over {result.get('val_tokens', 0):,} validation tokens; run folder {run_dir}"
                )
        events.flush()
        final = latest_complete_checkpoint(ckpt_root)
        trackers.finish(run_dir, interrupted=stop.agreed is not None, final_checkpoint=final.path if final else None)
        events.close()
    # no rank leaves before rank 0 has written everything: torchrun stops the others when one exits
    dist.barrier()
    if stop.agreed is not None:
        raise KeyboardInterrupt(stop.agreed)
    return result


def _print_sample(cfg: TrainConfig, bundle: ModelBundle, tokenizer: CodeTokenizer) -> None:
    t = cfg.training
    if not t.sample_tokens or not bundle.can_generate:
        return
    assert bundle.native is not None  # can_generate
    settings = SamplingSettings(max_new_tokens=t.sample_tokens, temperature=0.8, top_p=0.95, seed=t.seed)
    completion = generate(bundle.native, tokenizer, [t.sample_prompt], settings)[0][0]
    log("sample:\n" + t.sample_prompt + completion.text)


def final_metric(metrics: dict, name: str) -> float:
    value = metrics.get(name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")
