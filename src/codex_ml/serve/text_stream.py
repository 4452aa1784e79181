"""What of a growing completion may be sent yet: stop strings, partial characters and secrets held back.

A streamed completion must add up to exactly the text a non-streamed one returns, so nothing can be
taken back once sent. Withheld until they resolve: a tail that could still become a stop string, a
partial UTF-8 character (decoded as U+FFFD), and, when masking secrets, whatever could still become
part of one: an unterminated PEM block, an open quote on the current line, and the trailing run of
characters a key can be made of (letters, digits, ``_-+/=.:@``...; a space or ``,;()[]{}<>`` ends a run).
Findings of the detector (``data/secrets.py``) stay within a line (PEM blocks aside) and never span
those boundaries, so masking up to one gives a prefix of masking the whole.
"""

from __future__ import annotations

from collections import Counter

from codex_ml.data.secrets import find_secrets, mask_secrets

_QUOTES = "\"'`"
_BREAKS = ",;()[]{}<>"  # outside quotes, no secret pattern spans these: the text before them can be sent
_PATTERN_LEAD = 8  # punctuation a pattern may begin with before its first letter (-----BEGIN)


class ChoiceText:
    """The text of one choice as sent so far; ``update`` returns the next piece to send.

    Masking works line by line (the detector's rules are confined to a line, PEM blocks aside): a line
    is masked once, when complete, so a long stream costs the same per token as a short one. Lines
    split at every newline outside an open PEM block, the same way streamed or not.
    """

    def __init__(self, stops: list[str], redact: bool, prefix: str = "") -> None:
        self.stops, self.redact, self.prefix = [s for s in stops if s], redact, prefix  # prefix: the echoed prompt
        self.sent = ""
        self.masked: Counter = Counter()  # secrets masked, by kind
        self._done_raw, self._done_out = 0, ""  # complete lines: raw offset reached, and their masked text

    def update(self, completion: str, final: bool) -> str:
        raw = self.prefix + completion
        end = len(raw) if final else self._safe_end(raw)
        self._commit_lines(raw, end)
        tail = raw[self._done_raw : end]
        if self.redact and tail:
            masked, findings = mask_secrets(tail)
            if final:
                self.masked.update(f.kind for f in findings)
            tail = masked
        out = self._done_out + tail
        delta = out[len(self.sent) :] if out.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def _commit_lines(self, raw: str, end: int) -> None:
        at = self._done_raw
        while (nl := raw.find("\n", at, end)) >= 0:
            line = raw[self._done_raw : nl + 1]
            at = nl + 1
            begin = line.rfind("-----BEGIN")
            if begin >= 0 and "-----END" not in line[begin:]:
                continue  # inside a PEM block: the line goes on to its end marker
            if self.redact:
                line, findings = mask_secrets(line)
                self.masked.update(f.kind for f in findings)
            self._done_out += line
            self._done_raw = at

    def _safe_end(self, raw: str) -> int:
        end = len(raw)
        while end > len(self.prefix) and raw[end - 1] == "\ufffd":
            end -= 1
        for st in self.stops:  # the longest tail that begins a stop string
            for k in range(min(len(st) - 1, end), 0, -1):
                if raw[end - k : end] == st[:k]:
                    end -= k
                    break
        if self.redact:
            end = self._word_boundary(raw, end)
            begin = raw.rfind("-----BEGIN", self._done_raw, end)
            if begin >= 0 and "-----END" not in raw[begin:end]:
                end = begin
        return max(end, self._done_raw)

    def _word_boundary(self, raw: str, end: int) -> int:
        """The end of the open line's text that can no longer become part of a secret: before an open quote
        (a quoted value may hold anything), else after the last space or punctuation a key cannot contain."""
        line_start = self._done_raw
        quote, opened = None, -1
        for i in range(line_start, end):
            c = raw[i]
            if quote is None and c in _QUOTES:
                quote, opened = c, i
            elif c == quote:
                quote = None
        if quote is not None:
            end = opened
        run = end
        while run > line_start and not (raw[run - 1].isspace() or raw[run - 1] in _BREAKS):
            run -= 1
        # a run's leading punctuation ("....", "----") is no part of a key, which starts with a letter or digit;
        # the last few are kept back, as the start of "-----BEGIN" or "://" may be among them
        first_alnum = next((i for i in range(run, end) if raw[i].isalnum()), end)
        return max(run, first_alnum - _PATTERN_LEAD)


def count_secrets(text: str) -> Counter:
    """Secrets in ``text`` by kind (for metrics of texts not sent through ``ChoiceText``)."""
    return Counter(f.kind for f in find_secrets(text))
