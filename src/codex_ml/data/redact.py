"""Redacting one document: every secret and PII finding replaced by its kind's placeholder, code kept valid.

The findings come from ``data/secrets.py`` (the detector the server and evaluation output share). A
placeholder holds no quote, backslash or line break, so a finding inside a string literal or a comment
leaves the literal intact; placeholders are never findings themselves, so redacting twice changes
nothing. When a document parsed as Python before and no longer would (a finding that was code, such as
``a@b.shape`` taken for an e-mail address), only the findings inside string and comment tokens are
replaced; a document that still would not parse is refused (``RedactionError``), never kept with its
secret.
"""

from __future__ import annotations

import ast
import bisect
import io
import tokenize
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from codex_ml.data.secrets import DETECTORS, Finding, find_secrets, replace_findings

DEFAULT_PLACEHOLDER = "<KEY>"
PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ip_address": "<IP_ADDRESS>",
    "password": "<PASSWORD>",
    "connection_string": "<PASSWORD>",
    "private_key": "<PRIVATE_KEY>",
}


class RedactionError(Exception):
    """A document that cannot be redacted without breaking it; the pipeline skips it."""


@dataclass(frozen=True)
class Located:
    """A finding as the report shows it: where and what, never the value."""

    line: int  # 1-based line of the finding's first character
    kind: str
    detector: str


@dataclass
class Redacted:
    text: str
    findings: list[Located]


def placeholders_with(overrides: dict[str, str]) -> dict[str, str]:
    """The default placeholders updated by ``overrides`` (kind -> text; ``default`` for every other kind),
    each checked: ValueError for one that could break a string literal or that the detector would find."""
    out = {**PLACEHOLDERS, "default": DEFAULT_PLACEHOLDER, **dict(overrides)}
    for kind, text in out.items():
        if not text or any(c in text for c in "\"'\\\n\r`"):
            raise ValueError(
                f"placeholder for {kind!r} must be non-empty text without quotes, backslashes or "
                f"line breaks (it goes inside string literals); got {text!r}"
            )
        if find_secrets(f'password = "{text}"  # {text}'):
            raise ValueError(
                f"placeholder {text!r} for {kind!r} looks like a secret itself: redacting twice would change the text"
            )
    return out


def _parses(text: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old code: a warning, still valid
            ast.parse(text)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def _string_and_comment_spans(text: str) -> list[tuple[int, int]]:
    """Character ranges of the string literals and comments of Python source ``text``."""
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    offset = lambda pos: line_starts[pos[0] - 1] + pos[1]  # noqa: E731
    kinds = {tokenize.STRING, tokenize.COMMENT, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    spans = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in kinds:
            spans.append((offset(tok.start), offset(tok.end)))
    return spans


def _inside(f: Finding, spans: list[tuple[int, int]]) -> bool:
    i = bisect.bisect_right(spans, (f.start, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= f.start and f.end <= spans[i][1]


def redact_document(text: str, detectors: Iterable[str] = DETECTORS, placeholders: dict[str, str] | None = None) -> Redacted:
    """``text`` with each finding replaced by ``placeholders[kind]`` (default: ``placeholders_with({})``)."""
    findings = find_secrets(text, detectors)
    if not findings:
        return Redacted(text, [])
    names = placeholders or placeholders_with({})
    put = lambda f: names.get(f.kind, names["default"])  # noqa: E731
    out = replace_findings(text, findings, put)
    if not _parses(out) and _parses(text):
        spans = _string_and_comment_spans(text)
        findings = [f for f in findings if _inside(f, spans)]
        out = replace_findings(text, findings, put)
        if not _parses(out):
            raise RedactionError("redacting would break the Python syntax")
    located = [Located(text.count("\n", 0, f.start) + 1, f.kind, f.detector) for f in findings]
    return Redacted(out, located)
