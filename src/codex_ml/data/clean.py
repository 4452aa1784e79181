"""Cleaning raw documents: decode, drop binaries and outliers, de-duplicate, and count why.

Nothing here raises on a bad document: each one is kept or skipped with a reason, and the
``CleaningReport`` says how many of each.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from codex_ml.data.sources import RawDocument, ReadFailure

# Why a document was skipped; the summary prints these names.
BINARY, UNDECODABLE, TOO_LARGE, LONG_LINE, TOO_SMALL, DUPLICATE, UNREADABLE = REASONS = (
    "binary", "undecodable", "too_large", "long_line", "too_small", "duplicate", "unreadable",
)

# Bytes that never appear in text files: NUL and most C0 controls (tab, LF, FF, CR, ESC excepted).
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27)) + b"\x7f"


@dataclass
class Document:
    id: str
    text: str


@dataclass
class CleaningConfig:
    max_file_bytes: int = 1_000_000
    max_line_length: int = 1000
    min_chars: int = 16
    dedup: bool = True


@dataclass
class CleaningReport:
    kept: int = 0
    kept_chars: int = 0
    skipped: Counter = field(default_factory=Counter)
    decoded_from: Counter = field(default_factory=Counter)  # non-UTF-8 encodings that were detected
    examples: dict = field(default_factory=dict)  # reason -> a few document ids

    def skip(self, reason: str, doc_id: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(doc_id)

    def summary(self) -> str:
        lines = [f"kept {self.kept} documents ({self.kept_chars / 1e6:.2f}M characters)"]
        # every reason, zeros included, so the summary reads the same from run to run
        parts = ", ".join(f"{reason} {self.skipped.get(reason, 0)}" for reason in REASONS)
        lines.append(f"skipped {sum(self.skipped.values())}: {parts}")
        if self.decoded_from:
            parts = ", ".join(f"{enc} {n}" for enc, n in sorted(self.decoded_from.items()))
            lines.append(f"decoded from non-UTF-8 encodings: {parts}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "kept_chars": self.kept_chars, "skipped": dict(self.skipped),
                "decoded_from": dict(self.decoded_from), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> CleaningReport:
        return cls(d["kept"], d["kept_chars"], Counter(d["skipped"]), Counter(d["decoded_from"]), d["examples"])


def looks_binary(data: bytes) -> bool:
    """NUL bytes, or more than 2% control bytes (text has next to none), in the first 8 KiB."""
    head = data[:8192]
    if b"\x00" in head:
        return True
    if not head:
        return False
    controls = len(head) - len(head.translate(None, _CONTROL))
    return controls / len(head) > 0.02


def decode(data: bytes) -> tuple[str | None, str]:
    """The text and the encoding it was in; (None, "") when no encoding fits.

    UTF-8 first. Otherwise charset-normalizer's candidates: among those about as clean as the
    best (chaos within 0.1), the one whose text reads most like a language (coherence). When no
    candidate reads like any language, which is common for code with a few accented comments,
    Windows-1252 (a superset of Latin-1) wins if it decodes the bytes, since that is what most
    non-UTF-8 source files are in.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))
    if not matches:
        return None, ""
    best_chaos = min(m.chaos for m in matches)
    close = [m for m in matches if m.chaos <= best_chaos + 0.1]
    chosen = max(close, key=lambda m: m.coherence)  # the first of equals: charset-normalizer's order
    if chosen.coherence == 0:
        try:
            return data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            pass
    return str(chosen), chosen.encoding


def clean_documents(raw: Iterable[RawDocument | ReadFailure], config: CleaningConfig,
                    report: CleaningReport) -> Iterator[Document]:
    """Yield the documents worth training on, counting the others in ``report``."""
    seen: set[bytes] = set()
    for doc in raw:
        if isinstance(doc, ReadFailure):
            report.skip(UNREADABLE, doc.id)
            continue
        if doc.size > config.max_file_bytes:
            report.skip(TOO_LARGE, doc.id)
            continue
        if isinstance(doc.data, bytes):
            if looks_binary(doc.data):
                report.skip(BINARY, doc.id)
                continue
            text, encoding = decode(doc.data)
            if text is None:
                report.skip(UNDECODABLE, doc.id)
                continue
            if encoding != "utf-8":
                report.decoded_from[encoding] += 1
        else:
            text = doc.data
            if "\x00" in text:
                report.skip(BINARY, doc.id)
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from JSON escapes
                report.skip(UNDECODABLE, doc.id)
                continue
        if len(text.strip()) < config.min_chars:
            report.skip(TOO_SMALL, doc.id)
            continue
        if max(map(len, text.splitlines()), default=0) > config.max_line_length:
            report.skip(LONG_LINE, doc.id)
            continue
        if config.dedup:
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:
                report.skip(DUPLICATE, doc.id)
                continue
            seen.add(digest)
        report.kept += 1
        report.kept_chars += len(text)
        yield Document(doc.id, text)
