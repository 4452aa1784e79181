"""Where documents come from: the stdlib, directories of files, JSONL files, local HF datasets.

A source yields ``RawDocument``s (a stable id plus bytes or text) and a cheap fingerprint that
changes whenever its content may have changed (paths, sizes and modification times), which keys
the prepared-data cache without reading every byte.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codex_ml.errors import CodexError

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class DataSourceError(CodexError):
    """A data source that cannot be read (missing path, malformed record)."""


def jsonl_files(paths: list[str], error: type[CodexError]) -> list[Path]:
    """The JSONL files named by ``paths`` (a folder: every ``*.jsonl`` under it); ``error`` for a path
    that does not exist or holds none."""
    files = []
    for given in paths:
        p = Path(given).expanduser()
        if not p.exists():
            raise error(f"data path {given} does not exist")
        found = [p] if p.is_file() else sorted(p.rglob("*.jsonl"))
        if not found:
            raise error(f"data path {given} holds no .jsonl files")
        files += found
    return files


def jsonl_records(path: Path, error: type[CodexError]) -> Iterator[tuple[str, int, dict]]:
    """(``file:line``, line number, record) for every non-blank line; ``error`` naming the line for one
    that is not a JSON object."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise error(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise error(f"{where}: a record must be a JSON object")
            yield where, lineno, record


@dataclass
class RawDocument:
    id: str  # stable across machines: relative path, or file:line, or a record's id field
    data: bytes | str  # bytes for files (cleaning detects the encoding), text for records
    size: int  # in bytes, to skip huge documents before decoding them


@dataclass
class ReadFailure:
    id: str
    reason: str  # unreadable: an OS error


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[tuple[str, Path]]:
    """The running interpreter's standard library source, without tests and installed packages."""
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS & set(rel.parts[:-1]):
            continue
        out.append((rel.as_posix(), path))
    return out


def matching_files(paths: list[str], patterns: list[str]) -> list[tuple[str, Path]]:
    """Files under each directory (recursively) whose name matches a glob pattern, or files named directly."""
    out = []
    for given in paths:
        p = Path(given).expanduser()
        if not p.exists():
            raise DataSourceError(f"data path {given} does not exist")
        if p.is_file():
            out.append((p.name, p))
            continue
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if any(fnmatch.fnmatch(name, pat) for pat in patterns):
                    f = Path(dirpath) / name
                    out.append((f.relative_to(p).as_posix(), f))
    return out


def _stat_fingerprint(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for doc_id, path in files:
        try:
            st = path.stat()
            h.update(f"{doc_id}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError as e:
            h.update(f"{doc_id}\0{path}\0error {e.errno}\n".encode())
    return h.hexdigest()


class FileSource:
    """Documents read from files: the stdlib, or directories filtered by glob patterns."""

    def __init__(self, files: list[tuple[str, Path]], description: str) -> None:
        self.files = files
        self.description = description

    def fingerprint(self) -> str:
        return _stat_fingerprint(self.files)

    def __iter__(self) -> Iterator[RawDocument | ReadFailure]:
        for doc_id, path in self.files:
            try:
                data = path.read_bytes()
            except OSError as e:
                yield ReadFailure(doc_id, f"unreadable ({e.strerror or e})")
                continue
            yield RawDocument(doc_id, data, len(data))


class JsonlSource:
    """One document per JSON line, its text under ``text_field``."""

    def __init__(self, paths: list[str], text_field: str, id_field: str | None) -> None:
        self.files = [(f.name, f) for f in jsonl_files(paths, DataSourceError)]
        self.text_field, self.id_field = text_field, id_field
        self.description = f"jsonl {', '.join(paths)}"

    def fingerprint(self) -> str:
        return _stat_fingerprint(self.files) + f"|{self.text_field}|{self.id_field}"

    def __iter__(self) -> Iterator[RawDocument | ReadFailure]:
        for name, path in self.files:
            for where, lineno, record in jsonl_records(path, DataSourceError):
                if self.text_field not in record:
                    raise DataSourceError(f"{where}: record has no field {self.text_field!r} (data.text_field)")
                text = record[self.text_field]
                if not isinstance(text, str):
                    raise DataSourceError(f"{where}: field {self.text_field!r} is not a string")
                doc_id = str(record[self.id_field]) if self.id_field and self.id_field in record else f"{name}:{lineno}"
                yield RawDocument(doc_id, text, len(text.encode("utf-8", "surrogatepass")))


class HFDiskSource:
    """A Hugging Face dataset saved with ``save_to_disk`` (a Dataset, or a DatasetDict's splits)."""

    def __init__(self, paths: list[str], text_field: str, id_field: str | None) -> None:
        for given in paths:
            if not Path(given).expanduser().exists():
                raise DataSourceError(f"data path {given} does not exist")
        self.paths = [str(Path(p).expanduser()) for p in paths]
        self.text_field, self.id_field = text_field, id_field
        self.description = f"hf_disk {', '.join(paths)}"

    def fingerprint(self) -> str:
        files = []
        for p in self.paths:
            root = Path(p)
            files += [(f.relative_to(root).as_posix(), f) for f in sorted(root.rglob("*")) if f.is_file()]
        return _stat_fingerprint(files) + f"|{self.text_field}|{self.id_field}"

    def _datasets(self) -> Iterator[tuple[str, Any]]:
        import datasets

        for p in self.paths:
            try:
                loaded = datasets.load_from_disk(p)
            except Exception as e:  # datasets raises several types for a folder it cannot read
                raise DataSourceError(f"{p}: not a dataset saved with save_to_disk ({e})") from None
            if isinstance(loaded, datasets.DatasetDict):
                for split in sorted(loaded):
                    yield f"{Path(p).name}/{split}", loaded[split]
            else:
                yield Path(p).name, loaded

    def __iter__(self) -> Iterator[RawDocument | ReadFailure]:
        for name, ds in self._datasets():
            if self.text_field not in ds.column_names:
                raise DataSourceError(f"{name}: no column {self.text_field!r} (data.text_field); columns: {ds.column_names}")
            for i, record in enumerate(ds):
                text = record[self.text_field]
                if not isinstance(text, str):
                    raise DataSourceError(f"{name} row {i}: column {self.text_field!r} is not a string")
                doc_id = str(record[self.id_field]) if self.id_field and self.id_field in record else f"{name}:{i}"
                yield RawDocument(doc_id, text, len(text.encode("utf-8", "surrogatepass")))


def shard_range(count: int, rank: int, world_size: int) -> range:
    """The ``rank``-th of ``world_size`` contiguous, near-equal slices of ``count`` items: shards in rank order
    give the items in their order, which is what lets the merged output equal a single process's."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def source_shard(source: FileSource | JsonlSource | HFDiskSource, rank: int, world_size: int) -> FileSource | JsonlSource:
    """The part of ``source`` that task ``rank`` of ``world_size`` reads: a contiguous run of its files."""
    if not isinstance(source, (FileSource, JsonlSource)):
        raise DataSourceError("a sharded (datatrove) run reads files: data.source=hf_disk or a plugin's needs data.engine=local")
    part = [source.files[i] for i in shard_range(len(source.files), rank, world_size)]
    shard = copy.copy(source)
    shard.files = part
    return shard


def source_bytes(source: FileSource | JsonlSource | HFDiskSource) -> int | None:
    """The size of the source's files (what progress bars count towards); None when not known cheaply."""
    if not isinstance(source, (FileSource, JsonlSource)):  # a local dataset, or a plugin's source
        return None
    total = 0
    for _, path in source.files:
        try:
            total += path.stat().st_size
        except OSError:
            pass  # an unreadable file: counted as a skipped document, not here
    return total


def open_source(source: str, paths: list[str], patterns: list[str], text_field: str, id_field: str | None) -> Any:
    """The source named by ``data.source``: a built-in (FileSource, JsonlSource, HFDiskSource) or a plugin's."""
    if source == "stdlib":
        return FileSource(stdlib_files(), f"the Python standard library at {stdlib_root()}")
    if source == "files":
        return FileSource(matching_files(paths, patterns), f"files {', '.join(paths)} matching {', '.join(patterns)}")
    if source == "jsonl":
        return JsonlSource(paths, text_field, id_field)
    if source == "hf_disk":
        return HFDiskSource(paths, text_field, id_field)
    from codex_ml import plugins  # a plugin's source: data.source=NAME of an entry point in codex_ml.data_sources

    return plugins.open_data_source(source, paths, patterns, text_field, id_field)
