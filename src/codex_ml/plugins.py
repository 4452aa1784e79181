"""Named registries of reward functions, metrics and data sources, extended by Python entry points.

Each registry is a dict from name to object: codex-ml's built-ins (named ``module:attribute``, imported
when first used, so this module stays a low layer that imports nothing heavy) plus whatever installed
packages declare under the entry-point groups ``codex_ml.rewards``, ``codex_ml.metrics`` and
``codex_ml.data_sources``. A name is looked up when a run starts; an unknown one is an error listing
every name there is. ``docs/extending.md`` has a complete plugin package.

The interfaces follow TRL's reward-function convention, so a reward written for ``GRPOTrainer`` works here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from codex_ml.errors import CodexError


class PluginError(CodexError):
    """An unknown name, or a plugin that cannot be loaded or does not fit its interface."""


@runtime_checkable
class RewardFunction(Protocol):
    """``fn(prompts=[...], completions=[...], **columns) -> list[float]``: one reward per completion.

    ``columns`` are the problem's other fields (``task_id``, ``test``, ``entry_point``, ...), one list entry
    per completion, as TRL passes a dataset's columns. A reward may return ``None`` for a completion it
    cannot judge: that completion is left out of its group's normalisation (never scored 0).
    """

    def __call__(self, *, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]: ...


@runtime_checkable
class Metric(Protocol):
    """``fn(prompts=[...], completions=[...], **columns) -> float``: one figure over a step's completions.

    ``columns`` holds the problem fields and ``rewards`` (the combined reward of each completion).
    """

    def __call__(self, *, prompts: list[str], completions: list[str], **columns: Any) -> float: ...


@runtime_checkable
class DataSource(Protocol):
    """``factory(paths=[...], patterns=[...], text_field=..., id_field=...)`` returns an object with a
    ``description`` string, ``fingerprint() -> str`` (changes whenever the content may have changed: it keys
    the prepared-data cache) and ``__iter__`` yielding ``codex_ml.data.sources.RawDocument``s."""

    def __call__(self, *, paths: list[str], patterns: list[str], text_field: str, id_field: str | None) -> Any: ...


class Registry:
    """Objects by name: built-ins, then the installed entry points of ``group`` (a plugin may not shadow a built-in)."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str]) -> None:
        self.kind, self.group = kind, group
        self._builtins = dict(builtins)  # name -> "module:attribute"
        self._registered: dict[str, Any] = {}  # registered in code (tests, notebooks)

    def register(self, name: str, obj: Any) -> None:
        """Add ``obj`` under ``name`` for this process (plugins normally come through entry points)."""
        if not name or any(c.isspace() for c in name):
            raise PluginError(f"a {self.kind} name must be non-empty and without spaces; got {name!r}")
        if name in self.names():
            raise PluginError(f"{self.kind} {name!r} is already registered")
        self._registered[name] = obj

    def unregister(self, name: str) -> None:
        self._registered.pop(name, None)

    def names(self) -> list[str]:
        """Every available name: built-ins first, then plugins, each sorted."""
        plugins = set(self._entry_points()) | set(self._registered)
        return sorted(self._builtins) + sorted(plugins - set(self._builtins))

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def get(self, name: str) -> Any:
        """The object registered as ``name``; an unknown name is a :class:`PluginError` listing the names there are."""
        if name in self._builtins:
            return _load(self._builtins[name], f"built-in {self.kind} {name!r}")
        if name in self._registered:
            return self._registered[name]
        found = self._entry_points().get(name)
        if found is None:
            raise PluginError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        try:
            obj = found.load()
        except Exception as e:  # a plugin's import can fail any way; say which plugin it was
            raise PluginError(f"{self.kind} {name!r} (entry point {found.value} in {self.group}) cannot be loaded: {e}") from e
        if not callable(obj):
            raise PluginError(f"{self.kind} {name!r} (entry point {found.value}) is not callable")
        return obj

    def _entry_points(self) -> dict:
        return {ep.name: ep for ep in entry_points(group=self.group)}


def _load(target: str, what: str) -> Any:
    module, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise PluginError(f"{what} ({target}) cannot be loaded: {e}") from e


def check_names(registry: Registry, names: Iterable[str], key: str) -> None:
    """Every name in ``names`` is in ``registry``, or a :class:`PluginError` naming the config ``key``."""
    available = registry.names()
    for name in names:
        if name not in available:
            raise PluginError(f"{key}: unknown {registry.kind} {name!r}; available: {', '.join(available)}")


rewards = Registry(
    "reward",
    "codex_ml.rewards",
    {
        "execution": "codex_ml.rl.rewards:execution",
        "execution_fraction": "codex_ml.rl.rewards:execution_fraction",
        "format": "codex_ml.rl.rewards:format_reward",
        "length": "codex_ml.rl.rewards:length_reward",
    },
)
metrics = Registry(
    "metric",
    "codex_ml.metrics",
    {"distinct_1": "codex_ml.rl.step_metrics:distinct_1", "distinct_2": "codex_ml.rl.step_metrics:distinct_2"},
)
# the sources data/sources.py builds itself (stdlib, files, jsonl, hf_disk) are not entries: plugins only
data_sources = Registry("data source", "codex_ml.data_sources", {})


def call_metric(fn: Callable[..., Any], name: str, prompts: list[str], completions: list[str], columns: dict) -> float:
    """``fn``'s value on a step's completions, checked to be a number."""
    value = fn(prompts=prompts, completions=completions, **columns)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PluginError(f"metric {name!r} returned {type(value).__name__}, not a number")
    return float(value)


def open_data_source(name: str, paths: list[str], patterns: list[str], text_field: str, id_field: str | None) -> Any:
    """A plugin data source's documents object, checked to have what the data pipeline calls on it."""
    source = data_sources.get(name)(paths=paths, patterns=patterns, text_field=text_field, id_field=id_field)
    for attribute in ("description", "fingerprint", "__iter__"):
        if not hasattr(source, attribute):
            raise PluginError(f"data source {name!r} returned an object without {attribute!r} (see docs/extending.md)")
    return source
