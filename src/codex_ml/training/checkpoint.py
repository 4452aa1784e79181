"""Checkpoints that are either complete and verified, or invisible.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` holding any number of files, a
``manifest.json`` with each file's size and SHA-256, and a ``COMPLETE`` marker written last. It is
assembled under a temporary name, flushed to disk, and renamed into place in one atomic step, so a
process killed at any moment leaves either the whole checkpoint or none. Loading checks every file
against the manifest and names the first one that differs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codex_ml.errors import CodexError

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(CodexError):
    """A checkpoint that fails verification or cannot be read."""


@dataclass
class Checkpoint:
    step: int
    path: Path

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_torch_file(path: Path) -> Any:
    """Only tensors and plain containers: a checkpoint file never runs code when loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise CheckpointError(f"{path}: cannot be read ({e.__class__.__name__}: {e})") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    root: Path, step: int, files: dict[str, bytes], metrics: dict | None = None, extra: dict | None = None
) -> Path:
    """Write ``files`` (name -> content) as the checkpoint of ``step``; returns its folder.

    A complete checkpoint of the same step is kept as it is (a run resumed at that step).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    if (final / COMPLETE).exists():
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    entries = {}
    for name, data in files.items():
        _write(tmp / name, data)
        entries[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"step": step, "files": entries, "metrics": metrics or {}, **(extra or {})}
    _write(tmp / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    _write(tmp / COMPLETE, b"")
    _fsync_dir(tmp)
    if final.exists():  # an incomplete folder of that name, from some other tool: set it aside
        _discard(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def _discard(path: Path) -> None:
    """Rename first, then delete: a half-deleted folder never looks like a checkpoint."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_partial(root: Path) -> list[Path]:
    """Delete what an interrupted save or prune left behind (the caller holds the run's lock)."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Checkpoints with their completion marker, oldest first."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).exists():
                found.append(Checkpoint(int(m.group(1)), p))
    return sorted(found, key=lambda c: c.step)


def latest_complete_checkpoint(root: Path) -> Checkpoint | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> dict:
    """The manifest, once every file it lists has the recorded size and SHA-256."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for name, entry in sorted(files.items()):
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 differs from the manifest (the file is corrupted)")
    return manifest


def prune_checkpoints(root: Path, keep_last: int, keep_best: int, metric: str, mode: str) -> list[Path]:
    """Delete all but the newest ``keep_last`` and the best ``keep_best`` by ``metric``."""
    found = complete_checkpoints(root)
    keep = {c.path for c in found[-keep_last:]}
    if keep_best:
        scored = [(c.metrics[metric], c) for c in found if isinstance(c.metrics.get(metric), (int, float))]
        scored.sort(key=lambda sc: (sc[0] if mode == "min" else -sc[0], -sc[1].step))
        keep |= {c.path for _, c in scored[:keep_best]}
    removed = []
    for c in found:
        if c.path not in keep:
            _discard(c.path)
            removed.append(c.path)
    return removed


def best_checkpoint(root: Path, metric: str, mode: str) -> Checkpoint | None:
    scored = [c for c in complete_checkpoints(root) if isinstance(c.metrics.get(metric), (int, float))]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda c: c.metrics[metric])
