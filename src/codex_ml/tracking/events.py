"""The event log: events go to sinks on a background thread, ``metrics.ndjson`` first.

The training loop only puts events on a queue. A writer thread hands each event to the sinks in
order; the first sink (``metrics.ndjson``) is the source of truth. Any other sink that fails is
reported once, with the reason, and dropped, and training goes on.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TextIO


class Sink(Protocol):
    name: str

    def write(self, event: dict) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NdjsonSink:
    """One JSON object per line; a partial last line (a killed process) is dropped on open."""

    name = "metrics.ndjson"

    def __init__(self, path: Path, truncate_to: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            size = path.stat().st_size if truncate_to is None else truncate_to
            _truncate_to_last_newline(path, size)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held for the life of the run)

    def write(self, event: dict) -> None:
        self.file.write(json.dumps(event, default=_plain) + "\n")
        self.file.flush()

    def flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def size(self) -> int:
        self.file.flush()
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


def _truncate_to_last_newline(path: Path, size: int) -> None:
    with open(path, "rb+") as f:
        head = f.read(size)
        f.truncate(head.rfind(b"\n") + 1)


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars as Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_events(path: Path) -> list[dict]:
    """Every complete event of a metrics.ndjson (a torn last line is ignored)."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return events


_STOP = object()


class EventLog:
    """Queue events for the sinks; ``flush()`` waits until all of them are written."""

    def __init__(self, primary: NdjsonSink, others: list[Sink] | None = None, stream: TextIO = sys.stderr) -> None:
        self.primary = primary
        self.others = list(others or [])
        self.stream = stream
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="codex-ml-events", daemon=True)
        self.thread.start()

    def add_sink(self, sink: Sink) -> None:
        """Attach a sink later (e.g. one that took long to start); it sees events from now on."""
        self.queue.put(("add", sink))

    def log(self, event: dict) -> None:
        event.setdefault("time", time.time())
        self.queue.put(("event", event))

    def flush(self) -> None:
        done = threading.Event()
        self.queue.put(("flush", done))
        done.wait()
        if self.error is not None:
            raise RuntimeError(f"writing {self.primary.path} failed: {self.error}") from self.error

    def close(self) -> None:
        self.queue.put((_STOP, None))
        self.thread.join()
        for sink in [self.primary, *self.others]:
            self._guard(sink, sink.close)

    def _guard(self, sink: Sink, fn: Callable[..., object], *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:  # any failure of a tracker: report once, drop it, keep training
            if sink is self.primary:
                self.error = self.error or e
            else:
                print(
                    f"warning: tracker {sink.name} failed and is turned off for this run: {e.__class__.__name__}: {e}",
                    file=self.stream,
                    flush=True,
                )
                if sink in self.others:
                    self.others.remove(sink)
            return False

    def _drain(self) -> None:
        while True:
            kind, item = self.queue.get()
            if kind is _STOP:
                return
            if kind == "add":
                self.others.append(item)
            elif kind == "event":
                self._guard(self.primary, self.primary.write, item)
                for sink in list(self.others):
                    self._guard(sink, sink.write, item)
            elif kind == "flush":
                self._guard(self.primary, self.primary.flush)
                for sink in list(self.others):
                    self._guard(sink, sink.flush)
                item.set()


def finite_metrics(event: dict) -> dict[str, float]:
    """The numeric, finite fields of an event (what metric trackers can store)."""
    out = {}
    for k, v in event.items():
        if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out
