"""Shared fixtures: a corpus of real code, and an isolated cache for every test."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import stdlib_sample


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Forty real standard-library modules, copied so tests can add files next to them."""
    d = tmp_path_factory.mktemp("corpus")
    for p in stdlib_sample():
        (d / p.name).write_bytes(p.read_bytes())
    return d


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache: nothing leaks between tests or into the user's."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return cache
