"""The docs cannot drift: every bash block marked ``<!-- run -->`` in README.md and docs/*.md runs, and must succeed.

A marked block is a fenced ```` ```bash ```` block right after a line ``<!-- run -->``. The blocks of one page run in
order, each in its own ``bash -euo pipefail``, all in one fresh folder, with this interpreter's bin folder first on
PATH (so ``codex-ml`` and ``python`` are the ones under test). Blocks that cannot run in a test (a GPU, torchrun
across nodes, docker, the setup script itself) stay unmarked; a marker that is not followed by a bash block fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^\s*<!--\s*run\s*-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*run\b")  # also catches a misspelt marker, which must not be skipped silently
FENCE = re.compile(r"^\s*```")


def marked_blocks(text: str, name: str = "<text>") -> list[str]:
    """The bodies of the marked bash blocks of a Markdown text, in order; a marker without its block raises."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if not ANY_MARKER.search(lines[i]):
            i += 1
            continue
        if not MARKER.match(lines[i]):
            raise ValueError(f"{name}:{i + 1}: malformed marker {lines[i].strip()!r}; write exactly <!-- run -->")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j == len(lines) or lines[j].strip() != "```bash":
            raise ValueError(f"{name}:{i + 1}: <!-- run --> must be followed by a ```bash block")
        end = next((k for k in range(j + 1, len(lines)) if FENCE.match(lines[k])), None)
        if end is None:
            raise ValueError(f"{name}:{j + 1}: the ```bash block is never closed")
        blocks.append("\n".join(lines[j + 1 : end]) + "\n")
        i = end + 1
    return blocks


PAGES = {p.relative_to(ROOT).as_posix(): marked_blocks(p.read_text(), p.name) for p in DOCS}
RUNNABLE = [name for name, blocks in PAGES.items() if blocks]


def test_the_tutorial_is_executed():
    assert len(PAGES["docs/tutorial.md"]) >= 7, "the tutorial's steps are marked to run"
    assert "README.md" in RUNNABLE


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE)
def test_marked_blocks_run(page, tmp_path):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    for n, block in enumerate(PAGES[page], 1):
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (
            f"{page}, marked block {n} exited {proc.returncode}:\n{block}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )


def test_marker_parsing():
    text = "intro\n<!-- run -->\n\n```bash\necho one\n```\n```bash\necho unmarked\n```\n<!-- run -->\n```bash\necho two\n```\n"
    assert marked_blocks(text) == ["echo one\n", "echo two\n"]
    with pytest.raises(ValueError, match="followed by a ```bash block"):
        marked_blocks("<!-- run -->\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="malformed marker"):
        marked_blocks("<!-- run: fast -->\n```bash\necho x\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        marked_blocks("<!-- run -->\n```bash\necho x\n")


def test_a_failing_block_fails(tmp_path):
    """The runner's contract: bash -e stops at the first failing command of a block."""
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", marked_blocks("<!-- run -->\n```bash\nfalse\ntouch x\n```\n")[0]], cwd=tmp_path
    )
    assert proc.returncode != 0 and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- every documented command, checked against the schema

# codex-ml where a command starts (line start, after && ; | ( or a wrapper), as a path or the image's entrypoint
INVOCATION = re.compile(r"(?:^\s*|&&\s*|[;|(]\s*|\b(?:timeout \d+|srun|docker run)\s.*?)(?:\S*/)?codex-ml(?::\w+)?\s+(.*)$")
MODULE_INVOCATION = re.compile(r"-m codex_ml\.cli\s+(.*)$")
SWEEP_VALUE = re.compile(r"^[\w./]+=(?:[^\[\]]*,|\w+\()")  # a=x,y or a=interval(...): a value per job


def documented_invocations() -> list[tuple[str, str, list[str]]]:
    """(page:line, command, overrides) of every ``codex-ml`` line in a bash/shell block of README.md and docs/*.md,
    continuation lines joined; shell variables stand in as placeholder words."""
    import shlex

    found = []
    for page in DOCS:
        lines, in_block, i = page.read_text().splitlines(), False, 0
        while i < len(lines):
            line = lines[i]
            if FENCE.match(line):
                in_block = not in_block and line.strip().lstrip("`") in ("bash", "sh", "shell", "console")
                i += 1
                continue
            start = i
            while in_block and line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            i += 1
            code = line.split(" #")[0]
            m = (MODULE_INVOCATION.search(code) or INVOCATION.search(code)) if in_block else None
            if not m or line.lstrip().startswith("#") or line.lstrip().startswith("docker build"):
                continue
            words = shlex.split(re.sub(r"\$\{?(\w+)\}?", r"PLACEHOLDER_\1", m.group(1)).split("|")[0].split(">")[0])
            if not words or words[0].startswith("-"):
                continue  # `codex-ml --help`
            sweep = "-m" in words or "--multirun" in words
            overrides = [w for w in words[1:] if "=" in w and not (sweep and SWEEP_VALUE.match(w))]
            found.append((f"{page.relative_to(ROOT)}:{start + 1}", words[0], overrides))
    return found


def test_every_documented_command_composes():
    """Every ``codex-ml`` command the docs tell a user to type names a real command whose overrides compose into its
    typed config (no unknown key, no wrong type): a renamed key or command fails here before a user meets it."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from codex_ml.cli import COMMANDS
    from codex_ml.conf.overrides import quote_text_overrides
    from codex_ml.conf.store import register_schemas

    register_schemas()
    invocations = documented_invocations()
    assert len(invocations) >= 40, "the docs' commands are found"
    problems = []
    with initialize_config_module(config_module="codex_ml.conf", version_base=None):
        for where, command, overrides in invocations:
            if command not in COMMANDS:
                problems.append(f"{where}: unknown command {command!r}")
                continue
            args = [a for a in overrides if not a.startswith(("hydra.", "hydra/", "action="))]
            try:
                OmegaConf.to_object(compose(config_name=COMMANDS[command].config, overrides=quote_text_overrides(args)))
            except Exception as e:  # noqa: BLE001 - every failure is reported with its place in the docs
                problems.append(f"{where}: codex-ml {command} {' '.join(overrides)}: {type(e).__name__}: {str(e)[:200]}")
    assert not problems, "\n".join(problems)
