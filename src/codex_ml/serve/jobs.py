"""Jobs: `codex-ml train|evaluate` run by the server in a worker process, with state in SQLite.

A job's overrides are composed and checked by the same schema as the CLI before it is accepted (400
naming the key), and every path in them must lie under ``serve.data_root`` (data) or the runs root
(run folders): no ``..``, no symlink out. One runner thread starts queued jobs one at a time as
child processes (so the server's process tree holds them; they get SIGTERM if the server dies).
``DELETE`` sends SIGTERM, on which training saves a checkpoint. After a restart, jobs that were
running are queued again: training resumes from its run folder's last checkpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codex_ml.data.secrets import mask_secrets
from codex_ml.serve.errors import ApiError

if TYPE_CHECKING:
    from codex_ml.conf.schema import EvaluateConfig, TrainConfig

JOBS_DB = "jobs.db"  # beside the keys database
LOGS_DIR = "job-logs"
ACTIVE = ("queued", "running", "cancelling")
LOG_TAIL_BYTES = 64_000
_HYDRA_LOCK = threading.Lock()

# keys that would read or write outside the two roots, or change how the job runs
_REFUSED_KEYS = {"tracking.mlflow_uri", "data.cache_dir", "hydra"}
_DATA_PATH_KEYS = {"train": ("data.paths",), "evaluate": ("data_paths",)}
_MODEL_PATH_KEYS = {"train": ("model.path", "tokenizer.path"), "evaluate": ()}


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _confined(raw: str, root: Path | None, key: str, root_name: str) -> Path:
    """``raw`` resolved (symlinks followed) under ``root``; 400 otherwise. Relative paths are taken from
    the server's working directory, as the CLI takes them."""
    if root is None:
        raise ApiError(400, f"{key}: jobs may read data only under serve.data_root, which is not set", "path_refused")
    if ".." in Path(raw).parts:
        raise ApiError(400, f"{key}: '..' is not allowed in job paths", "path_refused")
    resolved = Path(raw).expanduser().resolve()
    if not _within(resolved, root):
        raise ApiError(400, f"{key}: {raw} lies outside the {root_name} {root}", "path_refused")
    return resolved


def _no_links_out(directory: Path, root: Path, key: str, limit: int = 200_000) -> None:
    """Refuse a data folder holding a symlink that resolves outside ``root`` (the data sources follow them)."""
    if not directory.is_dir():
        return
    seen = 0
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink() and not _within(p.resolve(), root):
                raise ApiError(400, f"{key}: {p} is a symlink outside the data_root {root}", "path_refused")
            seen += 1
            if seen > limit:
                raise ApiError(400, f"{key}: more than {limit} files under {directory}", "path_refused")


class JobManager:
    """Jobs in ``state_dir/jobs.db``, their logs in ``state_dir/job-logs/``, one runner thread."""

    def __init__(self, state_dir: Path, runs_root: str, data_root: str | None, python: str = sys.executable) -> None:
        self.state_dir = Path(state_dir)
        self.logs_dir = self.state_dir / LOGS_DIR
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.runs_root = Path(runs_root).expanduser().resolve()
        self.data_root = Path(data_root).expanduser().resolve() if data_root else None
        self.python = python
        self._db_path = self.state_dir / JOBS_DB
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, command TEXT, overrides TEXT, "
                "run_dir TEXT, max_steps INTEGER, state TEXT, created REAL, started REAL, finished REAL, "
                "exit_code INTEGER, pid INTEGER, cancel_requested INTEGER DEFAULT 0, attempts INTEGER DEFAULT 0, "
                "note TEXT)"
            )
        self._wake = threading.Event()
        self._stopping = False
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._db_path, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    # ------------------------------------------------------------------ validation

    def validate(self, command: str, overrides: list[str]) -> tuple[list[str], Path | None, int | None]:
        """(the overrides the worker runs, its run folder, max_steps) or a 400 naming the problem."""
        for o in overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            if o.startswith(("-", "+", "~")) or "=" not in o:
                raise ApiError(400, f"{o[:80]!r}: a job takes key=value overrides only", "invalid_override")
            if key.split(".")[0] in _REFUSED_KEYS or key in _REFUSED_KEYS:
                raise ApiError(
                    400, f"{key}: not allowed in jobs (it would place files outside the runs root)", "override_refused"
                )
        cfg = _compose(command, overrides)
        if command == "train":
            return self._train_paths(cfg, overrides)
        return self._evaluate_paths(cfg, overrides)

    def _train_paths(self, cfg: TrainConfig, overrides: list[str]) -> tuple[list[str], Path | None, int | None]:
        for key in ("data.paths",):
            for raw in cfg.data.paths:
                path = _confined(raw, self.data_root, key, "data_root")
                assert self.data_root is not None  # _confined refuses every path without one
                _no_links_out(path, self.data_root, key)
        for key in _MODEL_PATH_KEYS["train"]:
            section, attr = key.split(".")
            raw = getattr(getattr(cfg, section), attr)
            if raw:
                roots = [r for r in (self.runs_root, self.data_root) if r is not None]
                if ".." in Path(raw).parts or not any(_within(Path(raw).expanduser().resolve(), r) for r in roots):
                    raise ApiError(400, f"{key}: {raw} lies outside the runs root and the data_root", "path_refused")
        name, run_dir = cfg.run.name, cfg.run.dir
        if name is not None and (Path(name).name != name or name in (".", "..") or not name):
            raise ApiError(
                400, f"run.name: {name!r} must be a plain folder name under the runs root {self.runs_root}", "path_refused"
            )
        own_root = any(o.startswith("run.root=") for o in overrides)
        # unless the job names one, its run.root is the server's runs root (not the CLI's default, runs/ here)
        root = _confined(cfg.run.root, self.runs_root, "run.root", "runs root") if own_root else self.runs_root
        extra = []
        if run_dir:
            target = _confined(run_dir, self.runs_root, "run.dir", "runs root")
        else:
            if name is None:
                name = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
                extra.append(f"run.name={name}")  # fixed now, so a restart resumes the same folder
            target = root / name
            if not own_root:
                extra.append(f"run.root={root}")
        if target.exists() and not _within(target.resolve(), self.runs_root):
            raise ApiError(400, f"run folder {target} is a symlink outside the runs root {self.runs_root}", "path_refused")
        return [*overrides, *extra], target, cfg.training.max_steps

    def _evaluate_paths(self, cfg: EvaluateConfig, overrides: list[str]) -> tuple[list[str], Path | None, int | None]:
        assert cfg.run_dir is not None  # validate_evaluate (in _compose) requires it
        run_dir = _confined(cfg.run_dir, self.runs_root, "run_dir", "runs root")
        if cfg.checkpoint is not None and not (str(cfg.checkpoint).isdigit() or cfg.checkpoint in ("latest", "best")):
            raise ApiError(400, "checkpoint: jobs take a step number, latest or best", "path_refused")
        for raw in cfg.data_paths:
            path = _confined(raw, self.data_root, "data_paths", "data_root")
            assert self.data_root is not None  # _confined refuses every path without one
            _no_links_out(path, self.data_root, "data_paths")
        return list(overrides), run_dir, None

    # ------------------------------------------------------------------ the API

    def submit(self, command: str, overrides: list[str]) -> dict:
        final, run_dir, max_steps = self.validate(command, overrides)
        job_id = "job-" + secrets.token_hex(6)
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, command, overrides, run_dir, max_steps, state, created) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                (job_id, command, json.dumps(final), str(run_dir) if run_dir else None, max_steps, time.time()),
            )
        self._wake.set()
        job = self.get(job_id)
        assert job is not None  # inserted just above
        return job

    def get(self, job_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._describe(row)

    def list(self) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        return [self._describe(r) for r in rows]

    def logs(self, job_id: str) -> str:
        path = self.logs_dir / f"{job_id}.log"
        if not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return mask_secrets(f.read().decode("utf-8", "replace"))[0]

    def cancel(self, job_id: str) -> dict:
        with self._connect() as db:
            row = db.execute("SELECT state, pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row["state"] == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished = ? WHERE id = ?", (time.time(), job_id)
                )
            elif row["state"] == "running":
                db.execute("UPDATE jobs SET state = 'cancelling', cancel_requested = 1 WHERE id = ?", (job_id,))
                process = self._process
                if process is not None and process.pid == row["pid"] and process.poll() is None:
                    process.send_signal(signal.SIGTERM)  # training saves a checkpoint, then exits
        job = self.get(job_id)
        assert job is not None  # its row was read above
        return job

    def _describe(self, row: sqlite3.Row) -> dict:
        out = {
            "id": row["id"],
            "object": "job",
            "command": row["command"],
            "overrides": json.loads(row["overrides"]),
            "state": row["state"],
            "run_dir": row["run_dir"],
            "created_at": row["created"],
            "started_at": row["started"],
            "finished_at": row["finished"],
            "exit_code": row["exit_code"],
            "attempts": row["attempts"],
            "note": row["note"],
        }
        progress, last = _progress(row["run_dir"])
        if progress is not None:
            out["progress"] = {"step": progress, "max_steps": row["max_steps"]}
        out["last_metrics"] = last
        return out

    # ------------------------------------------------------------------ the runner

    def start(self) -> None:
        """Requeue what a previous server left running, then start the runner thread."""
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ? WHERE state IN ('running', 'cancelling') "
                "AND cancel_requested = 1",
                (time.time(),),
            )
            db.execute(
                "UPDATE jobs SET state = 'queued', pid = NULL, note = 'requeued after a server restart; "
                "training resumes from its last checkpoint' WHERE state = 'running'"
            )
        self._thread = threading.Thread(target=self._run, name="codex-ml-jobs", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the runner; a running worker gets SIGTERM (training checkpoints) and its job is queued again."""
        self._stopping = True
        self._wake.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next(self) -> sqlite3.Row | None:
        with self._connect() as db:
            return db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()

    def _run(self) -> None:
        while not self._stopping:
            row = self._next()
            if row is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._run_one(row)

    def _run_one(self, row: sqlite3.Row) -> None:
        job_id = row["id"]
        args = [self.python, "-m", "codex_ml.cli", row["command"], *json.loads(row["overrides"])]
        log = (self.logs_dir / f"{job_id}.log").open("ab")
        try:
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True, preexec_fn=_die_with_parent
            )
        except OSError as e:
            log.close()
            self._finish(job_id, "failed", None, f"could not start the worker: {e}")
            return
        self._process = process
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET state = 'running', pid = ?, started = COALESCE(started, ?), "
                "attempts = attempts + 1 WHERE id = ?",
                (process.pid, time.time(), job_id),
            )
            cancelled = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        if cancelled:
            process.send_signal(signal.SIGTERM)
        code = process.wait()
        log.close()
        self._process = None
        with self._connect() as db:
            cancel = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        if cancel:
            self._finish(job_id, "cancelled", code, None)
        elif self._stopping and code != 0:
            with self._connect() as db:  # the server is stopping: the job resumes at the next start
                db.execute(
                    "UPDATE jobs SET state = 'queued', pid = NULL, exit_code = ?, note = 'interrupted by a "
                    "server shutdown; resumes at the next start' WHERE id = ?",
                    (code, job_id),
                )
        else:
            self._finish(job_id, "succeeded" if code == 0 else "failed", code, None)

    def _finish(self, job_id: str, state: str, code: int | None, note: str | None) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET state = ?, exit_code = ?, finished = ?, pid = NULL, note = COALESCE(?, note) WHERE id = ?",
                (state, code, time.time(), note, job_id),
            )


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the server dies (training then checkpoints)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _compose(command: str, overrides: list[str]) -> Any:  # the command's typed config: TrainConfig or EvaluateConfig
    """The typed config the CLI would run, checked by the CLI's validator; 400 naming the key otherwise."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from codex_ml.conf import schema
    from codex_ml.conf.explain import explain
    from codex_ml.conf.overrides import VALIDATORS, quote_text_overrides
    from codex_ml.conf.store import register_schemas
    from codex_ml.errors import CodexError

    name = command  # the job commands (train, evaluate) are their own config roots
    args = quote_text_overrides(overrides)
    register_schemas()
    with _HYDRA_LOCK:
        try:
            if GlobalHydra.instance().is_initialized():  # inside `codex-ml serve`, Hydra's main already set it up
                cfg = compose(config_name=name, overrides=args)
            else:
                with initialize_config_module(config_module="codex_ml.conf", version_base=None):
                    cfg = compose(config_name=name, overrides=args)
        except HydraException as e:
            raise ApiError(400, explain(e, name), "invalid_override") from None
        except OmegaConfBaseException as e:
            raise ApiError(400, f"bad override: {str(e).splitlines()[0]}", "invalid_override") from None
    try:
        typed = OmegaConf.to_object(cfg)
        getattr(schema, VALIDATORS[name])(typed)
    except CodexError as e:
        raise ApiError(400, str(e), "invalid_override") from None
    except OmegaConfBaseException as e:
        raise ApiError(400, f"bad override: {str(e).splitlines()[0]}", "invalid_override") from None
    return typed


def _progress(run_dir: str | None) -> tuple[int | None, dict | None]:
    """The last step and the last metrics logged in the run's metrics.ndjson (its tail only)."""
    if not run_dir:
        return None, None
    path = Path(run_dir) / "metrics.ndjson"
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 32_000))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None, None
    step, last = None, None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if step is None and isinstance(event.get("step"), int):
            step = event["step"]
        if last is None and any(k in event for k in ("train_loss", "val_loss")):
            last = {k: v for k, v in event.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if step is not None and last is not None:
            break
    return step, last
