"""The on-disk record of a scanned shard of the corpus: one entry per source document, in source order.

Scanning (cleaning, redaction, decontamination, MinHash) writes a spool; the global decisions (exact and
near dedup, the split) and tokenization read it back, so no stage holds the corpus in memory. A spool is
a folder: ``records.jsonl`` (what was found: never the text), ``texts.bin`` (the redacted texts, UTF-8,
one after another) and ``signatures.u32`` (MinHash signatures, ``num_perm`` uint32 a row). It is JSON and
raw arrays, not pickle, so reading one back can never run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

import numpy as np

RECORDS, TEXTS, SIGNATURES, SPLITS = "records.jsonl", "texts.bin", "signatures.u32", "splits.u8"
DROPPED, TRAIN, VAL = 0, 1, 2  # a record's code in splits.u8


@dataclass
class Record:
    """One source document as scanned. ``skip``: the cleaning reason it was skipped for (no text then);
    ``failure``: the scan failed on it; ``matches``: benchmark items it holds (dropped then)."""

    id: str
    skip: str | None = None
    encoding: str | None = None  # the non-UTF-8 encoding it was decoded from
    digest: str = ""  # SHA-256 of the cleaned text: exact dedup and the content hash
    chars: int = 0  # characters of the cleaned text
    failure: str | None = None
    findings: list = field(default_factory=list)  # [line, kind, detector]
    matches: list = field(default_factory=list)  # {benchmark, item, field, method, score}
    key: str = ""  # SHA-256 of the redacted text: picks the kept document of a near-duplicate cluster
    signature: int = -1  # row in signatures.u32; -1: none (near-dedup off, or under n words)
    offset: int = 0  # of the redacted text in texts.bin, in bytes
    length: int = 0

    def to_json(self) -> str:
        # only what differs from the defaults: most records of a clean corpus are an id, a digest and a place
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != _DEFAULTS[f.name]})

    @classmethod
    def from_json(cls, line: str) -> Record:
        return cls(**json.loads(line))


_DEFAULTS = {f.name: getattr(Record(""), f.name) for f in fields(Record)} | {"id": None}


class SpoolWriter:
    """Appends records (with the redacted text and signature of a kept one) to a new spool folder."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._records = open(directory / RECORDS, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._texts = open(directory / TEXTS, "wb")  # noqa: SIM115
        self._signatures = open(directory / SIGNATURES, "wb")  # noqa: SIM115
        self._offset = self._rows = 0

    def add(self, record: Record, text: str | None = None, signature: np.ndarray | None = None) -> None:
        if text is not None:
            data = text.encode("utf-8", "surrogatepass")
            record.offset, record.length = self._offset, len(data)
            self._texts.write(data)
            self._offset += len(data)
        if signature is not None:
            record.signature = self._rows
            self._signatures.write(np.ascontiguousarray(signature, dtype=np.uint32).tobytes())
            self._rows += 1
        self._records.write(record.to_json() + "\n")

    def close(self) -> None:
        for f in (self._records, self._texts, self._signatures):
            f.close()


def records(directory: Path) -> Iterator[Record]:
    with open(directory / RECORDS, encoding="utf-8") as f:
        for line in f:
            yield Record.from_json(line)


class SpoolSignatures:
    """The signatures of some records of several spools, read from their ``signatures.u32`` on demand and never
    all at once (a ``near_dedup.SignatureSource``): document k is row ``rows[k]`` of spool ``spool_of[k]``, both
    ascending in k."""

    CHUNK_ROWS = 16384  # rows read at a time for a band: 16 MB at 256 permutations

    def __init__(self, spool_dirs: list[Path], spool_of: np.ndarray, rows: np.ndarray, num_perm: int) -> None:
        self.spool_dirs = spool_dirs
        self.shape = (len(rows), num_perm)
        self._rows = rows
        self._starts = np.searchsorted(spool_of, np.arange(len(spool_dirs) + 1))  # each spool's first document

    def band(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((self.shape[0], stop - start), dtype=np.uint32)
        for n, directory in enumerate(self.spool_dirs):
            k, end = int(self._starts[n]), int(self._starts[n + 1])
            while k < end:
                first = int(self._rows[k])
                upto = k + int(np.searchsorted(self._rows[k:end], first + self.CHUNK_ROWS))  # documents in this chunk
                chunk = self._read(directory, first, int(self._rows[upto - 1]) + 1 - first)
                out[k:upto] = chunk[:, start:stop][self._rows[k:upto] - first]  # the columns first: no copy of whole rows
                del chunk  # before the next is read: one chunk at a time
                k = upto
        return out

    def rows(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.shape[1]), dtype=np.uint32)
        spool_of = np.searchsorted(self._starts, indices, side="right") - 1
        size = self.shape[1] * 4
        for n in np.unique(spool_of):
            mine = spool_of == n
            wanted, place = np.unique(self._rows[indices[mine]], return_inverse=True)
            # read row by row, not mapped: a map would count the pages around every row read as resident
            with open(self.spool_dirs[n] / SIGNATURES, "rb") as f:
                data = b"".join([os.pread(f.fileno(), size, row * size) for row in wanted.tolist()])
            out[mine] = np.frombuffer(data, dtype=np.uint32).reshape(-1, self.shape[1])[place]
        return out

    def _read(self, directory: Path, first: int, count: int) -> np.ndarray:
        num_perm = self.shape[1]
        data = np.fromfile(directory / SIGNATURES, dtype=np.uint32, count=count * num_perm, offset=first * num_perm * 4)
        return data.reshape(count, num_perm)


def split_codes(directory: Path) -> np.ndarray:
    return np.fromfile(directory / SPLITS, dtype=np.uint8)


def documents(directory: Path, code: int) -> Iterator[tuple[str, str]]:
    """(id, redacted text) of the records whose split code is ``code``, in order."""
    codes = split_codes(directory)
    with open(directory / TEXTS, "rb") as texts:
        for record, c in zip(records(directory), codes):
            if c == code:
                texts.seek(record.offset)
                yield record.id, texts.read(record.length).decode("utf-8", "surrogatepass")


class SpoolTexts:
    """Reads single texts back from the spools' ``texts.bin`` files, each opened once."""

    def __init__(self, spool_dirs: list[Path]) -> None:
        self.spool_dirs = spool_dirs
        self._files: dict[int, BinaryIO] = {}

    def read(self, spool_index: int, offset: int, length: int) -> str:
        f = self._files.get(spool_index)
        if f is None:
            f = self._files[spool_index] = open(self.spool_dirs[spool_index] / TEXTS, "rb")  # noqa: SIM115
        f.seek(offset)
        return f.read(length).decode("utf-8", "surrogatepass")

    def __enter__(self) -> SpoolTexts:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            f.close()
