"""Tokenize documents in a pool of worker processes and write packed token shards.

A split is one stream of tokens (each document followed by end-of-text) cut into shards of raw
``uint16`` (``uint32`` for vocabularies over 65,536) that are memory-mapped for training. The
manifest lists every shard with its token count and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codex_ml.data.fim import FimSettings, fim_encode
from codex_ml.data.workers import ordered_map
from codex_ml.errors import CodexError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB at uint16


class ShardIntegrityError(CodexError):
    """A shard whose size or checksum differs from the manifest."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------- tokenizing in workers

_worker_tokenizer = None
_worker_fim = None


def _init_worker(tokenizer_file: str, fim: FimSettings | None = None) -> None:
    global _worker_tokenizer, _worker_fim
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_file)
    _worker_tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a document is text
    _worker_fim = fim


def _encode_batch(docs: list[tuple[str, str]]) -> list[list[int]]:
    tokenizer = _worker_tokenizer
    assert tokenizer is not None, "_init_worker sets the tokenizer in every pool worker"
    if _worker_fim is None:
        return [e.ids for e in tokenizer.encode_batch([t for _, t in docs], add_special_tokens=False)]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    return [fim_encode(text, doc_id, _worker_fim, encode) for doc_id, text in docs]


def _batches(docs: Iterable[tuple[str, str]], max_chars: int = 1 << 20) -> Iterator[list[tuple[str, str]]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[1])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_documents(
    docs: Iterable[tuple[str, str]], tokenizer_file: Path, num_workers: int, fim: FimSettings | None = None
) -> Iterator[list[int]]:
    """Token ids of each (id, text) document, in order; ``num_workers`` processes (0: this one), with a bounded
    number of batches in flight, so the documents stream through."""
    for encoded in ordered_map(_encode_batch, _batches(docs), num_workers, _init_worker, (str(tokenizer_file), fim)):
        yield from encoded


# ---------------------------------------------------------------- shards


@dataclass
class SplitStats:
    documents: int
    tokens: int
    shards: list[dict]


def write_split(
    token_lists: Iterable[Sequence[int] | np.ndarray],
    directory: Path,
    split: str,
    eos_id: int,
    dtype: np.dtype,
    shard_tokens: int = SHARD_TOKENS,
) -> SplitStats:
    """Concatenate documents (each followed by ``eos_id``) into shards named ``{split}_NNNNN.bin``; a shard ends
    after the document that brings it to ``shard_tokens``. Each document goes to disk as it comes, so memory does
    not grow with the split."""
    shards: list[dict] = []
    documents = tokens = 0
    out, digest, in_shard = None, hashlib.sha256(), 0

    def close() -> None:
        nonlocal out, digest, in_shard
        if out is None:
            return
        out.close()
        shards.append({"file": f"{split}_{len(shards):05d}.bin", "tokens": in_shard, "sha256": digest.hexdigest()})
        out, digest, in_shard = None, hashlib.sha256(), 0

    for ids in token_lists:
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = eos_id
        if out is None:
            out = open(directory / f"{split}_{len(shards):05d}.bin", "wb")  # noqa: SIM115 (closed by close())
        data = arr.tobytes()
        out.write(data)
        digest.update(data)
        in_shard += arr.size
        documents += 1
        tokens += arr.size
        if in_shard >= shard_tokens:
            close()
    close()
    return SplitStats(documents, tokens, shards)


def save_token_stream(token_lists: Iterable[Sequence[int]], directory: Path, split: str, dtype: np.dtype) -> int:
    """A split's documents as one shard of a distributed run holds them before the merge: ``{split}.tokens``
    (every document's ids, no end-of-text) and ``{split}.lengths`` (uint64 per document). Returns the count."""
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(directory / f"{split}.tokens", "wb") as tokens, open(directory / f"{split}.lengths", "wb") as lengths:
        for ids in token_lists:
            tokens.write(np.asarray(ids, dtype=dtype).tobytes())
            lengths.write(np.uint64(len(ids)).tobytes())
            count += 1
    return count


def read_token_streams(directories: Iterable[Path], split: str, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The documents ``save_token_stream`` wrote, shard after shard, read a document at a time (no memory map:
    its pages would count towards the process's resident memory)."""
    for directory in directories:
        lengths = np.fromfile(directory / f"{split}.lengths", dtype=np.uint64)
        with open(directory / f"{split}.tokens", "rb") as f:
            for n in lengths:
                yield np.frombuffer(f.read(int(n) * dtype.itemsize), dtype=dtype)


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def open_split(directory: Path, split: str, verify: bool = False) -> list[np.ndarray]:
    """The split's shards, memory-mapped, checked against the manifest's sizes (and SHA-256 if ``verify``)."""
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest["dtype"])
    arrays: list[np.ndarray] = []
    for shard in manifest["splits"][split]["shards"]:
        path = directory / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        if not path.exists() or path.stat().st_size != expected:
            raise ShardIntegrityError(f"{path}: missing or not {expected} bytes as {directory / MANIFEST} says")
        arr = np.memmap(path, dtype=dtype, mode="r")
        if verify and hashlib.sha256(arr.tobytes()).hexdigest() != shard["sha256"]:
            raise ShardIntegrityError(f"{path}: SHA-256 differs from {directory / MANIFEST}")
        arrays.append(arr)
    return arrays
