"""`data.engine=datatrove|datatrove_slurm`: the stages of ``stages.py`` as datatrove tasks over shards of the input.

Four executors, each depending on the one before: the scan (``data.engine_workers`` tasks, each a contiguous
run of the source's files), the global decisions and the tokenizer (one task), tokenization (one task per
shard) and the merge into one prepared-data folder and manifest (one task). The steps call the same
functions the single-process engine does, and every global decision is taken over all shards in source
order, so the output is byte-identical to ``data.engine=local``. Locally the executors are datatrove's
``LocalPipelineExecutor``; on a cluster ``SlurmPipelineExecutor`` submits them as dependent Slurm jobs.
Why datatrove: docs/data.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from codex_ml.conf.schema import DataConfig
from codex_ml.data.pack import read_token_streams, save_token_stream, write_split
from codex_ml.data.progress import PROGRESS_ENV
from codex_ml.data.sources import open_source, source_bytes, source_shard
from codex_ml.data.stages import (
    DECISIONS,
    OUTPUT_DIR,
    SCAN_DIR,
    TOKENS_DIR,
    Decisions,
    PipelineSpec,
    decide_stage,
    output_stage,
    scan_shard,
    token_dtype_of,
    tokenize_split,
    work_tokenizer,
)
from codex_ml.tokenizer.core import TOKENIZER_FILE

_INSTALL = "pip install 'codex-ml[datatrove]' (datatrove==0.10.1)"


def check_available() -> None:
    """Raise before any work when datatrove is missing, with the line that installs it."""
    _datatrove()


def _datatrove() -> Any:
    try:
        import datatrove.executor as executors
        from datatrove.pipeline.base import PipelineStep
    except ImportError as e:
        raise ImportError(f"data.engine=datatrove needs datatrove: {_INSTALL}") from e
    return executors, PipelineStep


@contextlib.contextmanager
def _bars_on_rank_zero(rank: int) -> Iterator[None]:
    """Progress bars in the first task only: several tasks drawing on one terminal would garble it."""
    before = os.environ.get(PROGRESS_ENV)
    if rank != 0:
        os.environ[PROGRESS_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = before


def _step_classes() -> dict[str, type]:
    """The pipeline steps, defined once datatrove is importable (their base class is datatrove's)."""
    _, pipeline_step = _datatrove()
    base: Any = pipeline_step  # datatrove ships no types: to mypy its base class is Any

    class _Step(base):
        type = "codex-ml"

        def __init__(self, work: Path, spec: PipelineSpec) -> None:
            super().__init__()
            self.work, self.spec = work, spec

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            with _bars_on_rank_zero(rank):
                self.stage(rank, world_size)
            if data:
                yield from data

        def stage(self, rank: int, world_size: int) -> None:
            raise NotImplementedError

    class Scan(_Step):
        name = "scan: clean, redact, decontaminate, MinHash"

        def stage(self, rank: int, world_size: int) -> None:
            shard = source_shard(open_source(*self.spec.source), rank, world_size)
            scan_shard(shard, self.spec.scan, 0, self.work / SCAN_DIR / f"{rank:05d}", source_bytes(shard))

    class Decide(_Step):
        name = "decide: exact and near dedup, split, tokenizer"

        def stage(self, rank: int, world_size: int) -> None:
            from datatrove.utils.logging import logger

            decide_stage(self.work, self.spec, logger.info)

    class Tokenize(_Step):
        name = "tokenize a shard"

        def stage(self, rank: int, world_size: int) -> None:
            tokenizer, directory, fim = work_tokenizer(self.work, self.spec)
            spool = self.work / SCAN_DIR / f"{rank:05d}"
            sizes = Decisions.load(self.work / DECISIONS).bytes
            for split in ("train", "val"):
                ids = tokenize_split([spool], split, directory / TOKENIZER_FILE, 0, fim, sizes[split] // world_size)
                save_token_stream(ids, self.work / TOKENS_DIR / f"{rank:05d}", split, token_dtype_of(tokenizer))

    class Merge(_Step):
        name = "merge into one prepared folder"

        def stage(self, rank: int, world_size: int) -> None:
            tokenizer, _, _ = work_tokenizer(self.work, self.spec)
            dtype = token_dtype_of(tokenizer)
            shards = sorted(p for p in (self.work / TOKENS_DIR).iterdir() if p.is_dir())
            out = self.work / OUTPUT_DIR
            splits = {
                split: write_split(read_token_streams(shards, split, dtype), out, split, tokenizer.eos_id, dtype)
                for split in ("train", "val")
            }
            output_stage(self.work, self.spec, splits)

    return {"scan": Scan, "decide": Decide, "tokenize": Tokenize, "merge": Merge}


def build_executors(work: Path, spec: PipelineSpec, data: DataConfig) -> Any:
    """The chain of executors for ``data.engine`` (the last one; running it runs those it depends on)."""
    executors, _ = _datatrove()
    steps = _step_classes()
    tasks = {"scan": data.engine_workers, "decide": 1, "tokenize": data.engine_workers, "merge": 1}
    previous = None
    for stage, step in steps.items():
        common: dict[str, Any] = {
            "pipeline": [step(work, spec)],
            "tasks": tasks[stage],
            "logging_dir": str(work / "logs" / stage),
            "depends": previous,
        }
        if data.engine == "datatrove":
            previous = executors.LocalPipelineExecutor(**common, workers=tasks[stage])
        else:
            activate = Path(sys.prefix) / "bin" / "activate"
            previous = executors.SlurmPipelineExecutor(
                **common,
                time=data.slurm_time,
                partition=data.slurm_partition,
                cpus_per_task=data.slurm_cpus_per_task,
                mem_per_cpu_gb=data.slurm_mem_per_cpu_gb,
                job_name=f"codex-ml-prepare-{stage}",
                venv_path=str(activate) if activate.exists() else None,
            )
    return previous


def run_datatrove(work: Path, spec: PipelineSpec, data: DataConfig, log: Callable[[str], None]) -> None:
    """Run (locally: to the end) or submit (Slurm) the chain; its output lands in WORK/output. Tasks a run
    already completed are skipped (datatrove's completion markers), so a rerun resumes."""
    if data.engine == "datatrove":
        log(f"datatrove: {data.engine_workers} local tasks over shards of the input (logs in {work / 'logs'})")
    else:
        log(f"datatrove: submitting {data.engine_workers} Slurm tasks a stage to partition {data.slurm_partition}")
    build_executors(work, spec, data).run()
