"""Peak memory of `codex-ml prepare` against the size of the corpus: streaming means it does not grow.

Writes corpora of the given sizes (the standard library's files over and over, each copy with its own first
line so that no file is an exact duplicate of another), trains one tokenizer beforehand, and runs
``codex-ml prepare`` on each with the defaults (redaction, near-dedup and HumanEval decontamination on) and
``data.num_workers`` workers. A sampler adds up the resident memory of prepare's whole process tree every
0.2 s; the table shows that peak, wall time, MB/s and tokens for each size. The last line, ``ratio: X``, is
the peak at the smallest size over the peak at the largest: 1.0 means memory independent of the corpus size.

    python benchmarks/data_scale.py                    # 1 GB and 4 GB: about an hour on 2 cores, 10 GB of disk
    python benchmarks/data_scale.py --sizes-mb 50 200  # minutes
    python benchmarks/data_scale.py --smoke            # 2 MB and 6 MB: checks the script works
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

from common import machine_line

CLI = [sys.executable, "-m", "codex_ml.cli"]
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_texts() -> list[bytes]:
    """The standard library's modules that cleaning keeps (UTF-8, 2 kB to 400 kB, no very long lines)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        data = path.read_bytes()
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        if 2000 <= len(data) <= 400_000 and lines and max(map(len, lines)) < 900:
            texts.append(data)
    return texts


def write_corpus(folder: Path, size_bytes: int, texts: list[bytes], tag: str) -> tuple[int, int]:
    """Copies of ``texts`` under ``folder`` until ``size_bytes``; each file starts with a line of its own."""
    size = files = copy = 0
    while size < size_bytes:
        d = folder / f"c{copy:04d}"
        d.mkdir(parents=True)
        for i, text in enumerate(texts):
            data = f"# copy {tag}.{copy}.{i}\n".encode() + text
            (d / f"f{i:04d}.py").write_bytes(data)
            size, files = size + len(data), files + 1
            if size >= size_bytes:
                break
        copy += 1
    return size, files


def run_watched(cmd: list[str], log: Path, limit_s: float) -> tuple[float, int, float]:
    """(peak summed RSS of the process tree in MB, exit status, wall seconds) of ``cmd``."""
    start, peak = time.perf_counter(), 0
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        rss = 0
        for p in tree:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass  # a worker that just exited holds no memory
        peak = max(peak, rss)
        if time.perf_counter() - start > limit_s:
            for p in reversed(tree):
                p.kill()
            proc.wait()
            sys.exit(f"prepare ran past {limit_s:.0f} s; see {log}")
        time.sleep(0.2)
    return peak / 2**20, proc.returncode, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--limit-s", type=float, default=7200, help="per prepare run")
    parser.add_argument("--keep", help="write the corpora and runs here and keep them (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    sizes = [2, 6] if args.smoke else sorted(args.sizes_mb)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="codex-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts()
    try:
        tok = work / "tokenizer"
        subprocess.run([*CLI, "tokenizer", "tokenizer.vocab_size=4096", f"out={tok}"], check=True, capture_output=True)
        rows = []
        for mb in sizes:
            corpus = work / f"corpus_{mb}mb"
            size, files = write_corpus(corpus, mb * 10**6, texts, str(mb))
            log = work / f"prepare_{mb}mb.log"
            cmd = [
                *CLI,
                "prepare",
                "data.source=files",
                f"data.paths=[{corpus}]",
                f"data.num_workers={args.workers}",
                f"tokenizer.path={tok}",
                f"data.cache_dir={work / f'cache_{mb}'}",
                f"run.dir={work / f'run_{mb}'}",
            ]
            peak, rc, wall = run_watched(cmd, log, args.limit_s)
            if rc != 0:
                sys.exit(f"prepare of {mb} MB exited {rc}:\n{log.read_text()[-3000:]}")
            found = re.findall(r"^prepared ([\d,]+) train and ([\d,]+) validation tokens", log.read_text(), re.M)
            tokens = sum(int(x.replace(",", "")) for x in found[-1]) if found else 0
            rows.append((mb, size, files, peak, wall, tokens))
            shutil.rmtree(corpus)  # keep the disk to about twice the largest corpus
            shutil.rmtree(work / f"cache_{mb}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(machine_line())
    print(f"codex-ml prepare, data.num_workers={args.workers}, redaction + near-dedup + decontamination on")
    print("| corpus (MB) | files | peak RSS of the process tree (MB) | wall (s) | MB/s | tokens |")
    print("|---|---|---|---|---|---|")
    for _mb, size, files, peak, wall, tokens in rows:
        print(f"| {size / 1e6:.0f} | {files} | {peak:.0f} | {wall:.0f} | {size / 1e6 / wall:.2f} | {tokens} |")
    # peaks as printed, so the ratio is the quotient of the table's own figures
    print(f"ratio: {round(rows[0][3]) / round(rows[-1][3]):.2f}")


if __name__ == "__main__":
    main()
