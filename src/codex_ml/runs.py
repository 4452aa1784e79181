"""Run folders: where a run lives, and the lock that keeps a second process out of it."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from codex_ml.errors import CodexError

CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.ndjson"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"


class RunError(CodexError):
    """A run folder that cannot be used: locked by another process, or not a run."""


def resolve_run_dir(root: str, name: str | None, directory: str | None, sweep_job_dir: str | None = None) -> Path:
    """``run.dir`` if given, else ``run.root/run.name``; a sweep job's own folder; else a timestamp."""
    if directory:
        return Path(directory).expanduser().resolve()
    if name:
        return (Path(root).expanduser() / name).resolve()
    if sweep_job_dir:
        return Path(sweep_job_dir).resolve()
    return (Path(root).expanduser() / time.strftime("%Y%m%d-%H%M%S")).resolve()


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` for the life of the process (released even on SIGKILL)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RunError(
                    f"run folder {self.path.parent} is in use by another process (pid {holder}); "
                    "wait for it to finish or stop it first"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
