"""Recipe: `codex-ml serve`, a run's model behind the OpenAI-compatible API until SIGTERM.

Loads the model (a native run, a ``model=hf`` or LoRA run merged, or an exported Hugging Face folder
with ``serve.model_path``; Llama-family models run in the native decoder, other architectures in their
own layers over the scheduler's cache, ``serve/hf_decoder.py``),
refuses unsafe set-ups (no auth off loopback, a public address without keys), prints the URL and the
model id, and serves. SIGTERM (or Ctrl-C) stops accepting, lets in-flight requests finish within
``serve.drain_timeout_s``, stops the jobs' workers so they checkpoint, and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from codex_ml.conf.schema import ServeCommandConfig, ServeConfig, is_loopback
from codex_ml.errors import CodexError
from codex_ml.models.gpt import GPT
from codex_ml.serve.app import AppSettings, create_app
from codex_ml.serve.auth import KeyStore
from codex_ml.serve.generation import ServedModel
from codex_ml.serve.hf_decoder import HFSlotDecoder, wrap_hf_model
from codex_ml.serve.limits import Caps
from codex_ml.serve.request_log import REQUEST_LOG_FILE, RequestLog
from codex_ml.serve.scheduler import Scheduler
from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.training.device import resolve_device

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp
    from transformers import PretrainedConfig, PreTrainedModel


def load_served_model(cfg: ServeCommandConfig, device: torch.device) -> tuple[GPT | HFSlotDecoder, CodeTokenizer, Path, str]:
    """(decoder in eval mode, tokenizer, tokenizer folder, model id)."""
    model: torch.nn.Module
    if cfg.serve.model_path:
        from codex_ml.models.hf import load_hf_causal_lm

        path = Path(cfg.serve.model_path).expanduser().resolve()
        model, tok_dir, default_id = load_hf_causal_lm(path, torch.float32, torch.device("cpu")), path, path.name
    else:
        from codex_ml.recipes.checkpoints import load_run_model
        from codex_ml.runs import TOKENIZER_DIR

        assert cfg.run_dir is not None  # validate_serve: run_dir or serve.model_path
        run_dir = Path(cfg.run_dir).expanduser().resolve()
        model, _, _ = load_run_model(run_dir, cfg.checkpoint, torch.device("cpu"))
        tok_dir, default_id = run_dir / TOKENIZER_DIR, run_dir.name
    decoder = model if isinstance(model, GPT) else to_decoder(cast("PreTrainedModel", model.to(device)), cfg.serve.compile)
    decoder = decoder.to(device).eval()
    if device.type == "cpu":
        decoder.fuse_for_inference()  # as codex-ml generate decodes on CPU: one matmul for q/k/v, one for gate/up
    return decoder, CodeTokenizer.load(tok_dir), tok_dir, cfg.serve.model_id or default_id


def to_decoder(model: PreTrainedModel, compile: bool) -> GPT | HFSlotDecoder:
    """A Hugging Face model for the scheduler: the native decoder where its weights map exactly (the Llama
    family), else the model's own layers over the slot cache (checked against its own forward)."""
    from codex_ml.models.convert import hf_to_native

    if maps_to_native(model.config):
        return hf_to_native(model)
    if compile:
        raise CodexError(
            f"serve.compile=true compiles the native decoder, and this {model.config.model_type} model runs in its own "
            "layers: serve it with serve.compile=false"
        )
    vocab = model.config.get_text_config().vocab_size
    return wrap_hf_model(model, [i % vocab for i in range(1, 17)])


def maps_to_native(config: PretrainedConfig) -> bool:
    from codex_ml.models.convert import ConversionError, gpt_config_from_llama

    try:
        gpt_config_from_llama(config)
    except ConversionError:
        return False
    return True


def serving_threads(configured: int) -> int:
    """torch's CPU threads for the model: ``configured``, or one less than the cores (at least one).

    The event loop streaming every token shares the CPU with the model: when the model's threads take
    every core, the loop preempts one of them inside each parallel region and the others wait at its
    barrier, so decoding slows down more than one thread fewer costs (measured in docs/benchmarks.md).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # Linux: the allowed ones
    return configured or max(1, cores - 1)


def check_exposure(s: ServeConfig, keys: KeyStore | None) -> None:
    """No auth off loopback (also checked with the config), and no public address without a key."""
    if keys is None:
        return
    if keys.active_count() == 0:
        if not is_loopback(s.host):
            raise CodexError(
                f"serve.host={s.host} is not a loopback address and {keys.path} holds no active key: "
                "create one first (codex-ml keys create name=NAME)"
            )
        print(
            f"note: {keys.path} holds no active key; every request but /health will get 401 (codex-ml keys create name=NAME)",
            flush=True,
        )


def build(cfg: ServeCommandConfig, quiet: bool = False) -> tuple[ASGIApp, FastAPI, str]:
    """(ASGI app, FastAPI app, model id) for ``cfg``: everything but the listening socket."""
    s = cfg.serve
    device = resolve_device(cfg.device)
    model, tokenizer, tok_dir, model_id = load_served_model(cfg, device)
    keys = KeyStore(s.keys_db) if s.auth else None
    check_exposure(s, keys)
    state_dir = Path(s.keys_db).expanduser().resolve().parent
    from codex_ml.serve.jobs import JobManager

    jobs = JobManager(state_dir, runs_root=s.runs_root, data_root=s.data_root)
    scheduler = Scheduler(model, tokenizer, s.max_batch, s.max_queue, compiled=s.compile)
    served = ServedModel(model_id, tokenizer, tok_dir, scheduler)
    settings = AppSettings(
        Caps(s.max_tokens, s.max_n, s.max_prompts, s.max_stop, s.max_stop_chars, s.max_logprobs),
        s.max_body_bytes,
        s.requests_per_minute,
        s.tokens_per_minute,
        s.max_concurrent_per_key,
        s.redact_output,
        quiet=quiet,
    )
    request_log = RequestLog(state_dir / REQUEST_LOG_FILE) if s.log_requests else None
    app, asgi = create_app(served, settings, keys, jobs, request_log)
    metrics = app.state.metrics
    scheduler.on_first_token = metrics.time_to_first_token.observe
    scheduler.on_finished = metrics.on_finished
    scheduler.start()
    return asgi, app, model_id


_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "uvicorn.error": {"level": "WARNING"},
        "uvicorn.access": {"handlers": [], "propagate": False},
    },
}


def serve_command(cfg: ServeCommandConfig) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after a graceful shutdown (exit status 143); a drained server exits 0
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    s = cfg.serve
    torch.set_num_threads(serving_threads(s.threads))
    asgi, _, model_id = build(cfg)
    config = uvicorn.Config(
        asgi,
        host=s.host,
        port=s.port,
        log_config=_LOG_CONFIG,
        access_log=False,
        # uvicorn types it int, but it is a timeout in seconds: fractions work
        timeout_graceful_shutdown=s.drain_timeout_s,  # type: ignore[arg-type]
        lifespan="on",
        server_header=False,
    )
    host = f"[{s.host}]" if ":" in s.host else s.host
    print(f"serving model {model_id} at http://{host}:{s.port}/v1 (OpenAI-compatible; health at /health)", flush=True)
    Server(config).run()
    print("server stopped", file=sys.stderr, flush=True)
