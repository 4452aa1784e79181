"""Fill-in-the-middle: deterministic per document, both layouts, and the text survives rearrangement."""

from codex_ml.data.fim import FimSettings, fim_encode, fim_prompt

P, M, S = 1001, 1002, 1003
encode = lambda text: [ord(c) for c in text]
decode = lambda ids: "".join(chr(i) for i in ids)


def parts(ids):
    """(prefix, middle, suffix) text of a PSM or SPM sequence."""
    if ids[1] == S:  # SPM: <pre><suf> suffix <mid> prefix+middle
        i = ids.index(M)
        return None, decode(ids[i + 1 :]), decode(ids[2:i])
    s, m = ids.index(S), ids.index(M)
    return decode(ids[1:s]), decode(ids[m + 1 :]), decode(ids[s + 1 : m])


def test_psm_rearranges_and_keeps_every_character():
    text = "def add(a, b):\n    return a + b\n"
    settings = FimSettings(1.0, "psm", 0.5, P, M, S)
    ids = fim_encode(text, "a.py", settings, encode)
    assert ids[0] == P and ids.count(S) == 1 and ids.count(M) == 1
    prefix, middle, suffix = parts(ids)
    assert prefix + middle + suffix == text


def test_spm_layout_and_text():
    text = "class A:\n    pass\n"
    ids = fim_encode(text, "b.py", FimSettings(1.0, "spm", 0.5, P, M, S), encode)
    assert ids[:2] == [P, S]
    _, prefix_and_middle, suffix = parts(ids)
    assert prefix_and_middle + suffix == text


def test_rate_zero_and_determinism():
    text = "x = 1\n" * 20
    assert fim_encode(text, "c.py", FimSettings(0.0, "psm", 0.5, P, M, S), encode) == encode(text)
    s = FimSettings(0.5, "mixed", 0.5, P, M, S, seed=3)
    runs = [[fim_encode(text, f"{i}.py", s, encode) for i in range(200)] for _ in range(2)]
    assert runs[0] == runs[1]
    transformed = sum(r[0] == P for r in runs[0])
    assert 70 < transformed < 130  # about half, by rate
    assert any(r[:2] == [P, S] for r in runs[0]) and any(r[0] == P and r[1] != S for r in runs[0])


def test_infilling_prompt():
    assert fim_prompt([5, 6], [7], (P, M, S)) == [P, 5, 6, S, 7, M]
