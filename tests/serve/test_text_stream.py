"""Streamed text adds up to the final text: stop strings, partial characters and secrets held back."""

from __future__ import annotations

import random

from codex_ml.serve.text_stream import ChoiceText

GH = "ghp_" + "x1Y2z3" * 6


def stream(full: str, stops, redact, cuts, prefix=""):
    t = ChoiceText(stops, redact, prefix)
    sent = "".join(t.update(full[:c], final=False) for c in cuts)
    return sent + t.update(full, final=True), t


def test_stream_equals_final_for_any_split():
    rng = random.Random(0)
    full = f"def f(x):\n    token = '{GH}'\n    return x  # done\n"
    for redact in (True, False):
        want = ChoiceText([], redact).update(full, final=True)
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(full)), 12))
            got, _ = stream(full, [], redact, cuts)
            assert got == want
            assert (GH not in got) == redact


def test_a_secret_never_leaves_half_written():
    t = ChoiceText([], True)
    full = f"key = {GH}\n"
    sent = "".join(t.update(full[:i], final=False) for i in range(1, len(full)))
    assert "ghp_" not in sent and "x1Y2" not in sent
    assert GH not in sent + t.update(full, final=True)
    assert t.masked["github_token"] == 1


def test_stop_prefixes_and_partial_characters_are_held_back():
    t = ChoiceText(["\nclass"], False)
    assert t.update("x = 1\ncl", final=False) == "x = 1"  # "\ncl" may become the stop string
    assert t.update("x = 1\nclose()", final=False) == "\nclose()"
    assert t.update("x = 1\nclose() é\ufffd", final=False) == " é"  # U+FFFD: a character still incomplete
    assert ChoiceText([], False, prefix="def f(").update("x)", final=True) == "def f(x)"


def test_a_long_stream_masks_each_line_once(monkeypatch):
    import codex_ml.serve.text_stream as ts

    seen = []
    real = ts.mask_secrets
    monkeypatch.setattr(ts, "mask_secrets", lambda text: seen.append(len(text)) or real(text))
    full = "".join(f"    value_{i} = compute({i}, 'x')\n" for i in range(300))
    t = ChoiceText([], True)
    sent = "".join(t.update(full[:i], final=False) for i in range(0, len(full), 3)) + t.update(full, final=True)
    assert sent == full
    assert sum(seen) < 20 * len(full)  # the open line at each token, not the whole prefix (~len**2 / 6)


def test_punctuation_releases_text_but_open_quotes_hold_it():
    t = ChoiceText([], True)
    assert t.update("f(a,,,,,,,,", final=False) == "f(a,,,,,,,,"  # no key is made of commas
    t = ChoiceText([], True)
    assert t.update(f'x = "{GH[:10]}, more', final=False) == "x = "  # inside quotes anything may belong to a value
    t = ChoiceText([], True)
    full = f"call(key={GH}, other)\n"
    sent = "".join(t.update(full[:i], final=False) for i in range(1, len(full)))
    assert "ghp_" not in sent and sent + t.update(full, final=True) == ChoiceText([], True).update(full, final=True)


def test_runs_of_punctuation_flow_but_a_pem_header_is_held():
    t = ChoiceText([], True)
    assert t.update("." * 100, final=False) == "." * 92  # a model stuck on dots still streams
    t = ChoiceText([], True)
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n"
    full = "x\n" + "-" * 20 + pem
    sent = "".join(t.update(full[:i], final=False) for i in range(1, len(full)))
    assert "MIIEow" not in sent and sent + t.update(full, final=True) == ChoiceText([], True).update(full, final=True)
