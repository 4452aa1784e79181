"""One tiny trained run for every serving test, and servers on loopback started in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import run_cli, stdlib_sample, tiny_train_args
from serve.serving import RunningServer, serve_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step tiny run (64-token context, a 400-token BPE with FIM and chat tokens) on real code."""
    base = tmp_path_factory.mktemp("serve-run")
    corpus = base / "corpus"
    corpus.mkdir()
    for p in stdlib_sample(20):
        (corpus / p.name).write_bytes(p.read_bytes())
    run = base / "runs" / "tiny"
    run_cli(
        "train",
        *tiny_train_args(corpus, run, steps=2, extra=["training.checkpoint_every=2"]),
        env={"XDG_CACHE_HOME": str(base / "cache"), "OMP_NUM_THREADS": "1"},
    )
    return run


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-state")


@pytest.fixture(scope="module")
def api_key(state_dir) -> str:
    from codex_ml.serve.auth import KeyStore

    return KeyStore(state_dir / "keys.db").create("tester")


@pytest.fixture(scope="module")
def server(tiny_run, state_dir, api_key):
    """The default settings, max_batch 32, one key ``tester``."""
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    s = RunningServer(serve_config(tiny_run, state_dir, max_batch=32, requests_per_minute=100000, max_concurrent_per_key=64))
    yield s
    s.stop()
