"""Cleaning: encodings detected, binaries and outliers skipped, duplicates dropped, every skip counted."""

import random

from codex_ml.data.clean import CleaningConfig, CleaningReport, clean_documents, looks_binary
from codex_ml.data.sources import FileSource, matching_files

CODE = "def f(x):\n    return x + 1\n" * 5


def clean_dir(d, **kw):
    report = CleaningReport()
    docs = list(clean_documents(FileSource(matching_files([str(d)], ["*.py"]), "test"), CleaningConfig(**kw), report))
    return {doc.id: doc.text for doc in docs}, report


def test_dirty_corpus_is_cleaned_and_counted(tmp_path):
    (tmp_path / "good.py").write_text(CODE)
    (tmp_path / "dup.py").write_text(CODE)
    (tmp_path / "latin1.py").write_bytes("# café déjà vu\nx = 'naïve'\n".encode("latin-1") * 40)
    (tmp_path / "cp1252.py").write_bytes("s = \u201csmart quotes\u201d \u2013 dash\n".encode("cp1252") * 40)
    (tmp_path / "blob.py").write_bytes(random.Random(0).randbytes(5000))
    (tmp_path / "huge.py").write_bytes(b"x = 1\n" * 50_000)
    (tmp_path / "longline.py").write_bytes(b"x = '" + b"a" * 5000 + b"'\n")
    (tmp_path / "empty.py").write_text("\n\n")
    (tmp_path / "broken.py").symlink_to(tmp_path / "missing-target")
    (tmp_path / "notes.txt").write_text(CODE)  # not matched by *.py
    docs, report = clean_dir(tmp_path, max_file_bytes=100_000, max_line_length=1000)
    assert set(docs) == {"good.py", "latin1.py", "cp1252.py"} or set(docs) == {"dup.py", "latin1.py", "cp1252.py"}
    assert "café déjà vu" in docs["latin1.py"]
    assert "\u201csmart quotes\u201d" in docs["cp1252.py"]
    assert dict(report.skipped) == {"duplicate": 1, "binary": 1, "too_large": 1, "long_line": 1, "too_small": 1,
                                    "unreadable": 1}
    assert report.kept == 3
    assert sum(report.decoded_from.values()) == 2
    summary = report.summary()
    assert "binary 1" in summary and "duplicate 1" in summary and "undecodable 0" in summary
    assert "kept 3 documents" in summary


def test_legacy_encodings_are_detected(tmp_path):
    samples = {
        "ru.py": "# Привет, мир: это комментарий на русском языке\nx = 'код'\n" * 20,
        "jp.py": "# こんにちは世界、日本語のコメントです\nx = '日本語'\n" * 20,
        "fr.py": "# Ceci est un commentaire écrit en français, à la française\nx = 'été'\n" * 20,
    }
    encodings = {"ru.py": "cp1251", "jp.py": "shift_jis", "fr.py": "latin-1"}
    for name, text in samples.items():
        (tmp_path / name).write_bytes(text.encode(encodings[name]))
    docs, report = clean_dir(tmp_path)
    assert docs == samples
    assert sum(report.decoded_from.values()) == 3


def test_dedup_can_be_turned_off(tmp_path):
    (tmp_path / "a.py").write_text(CODE)
    (tmp_path / "b.py").write_text(CODE)
    docs, report = clean_dir(tmp_path, dedup=False)
    assert len(docs) == 2 and not report.skipped


def test_looks_binary():
    assert looks_binary(b"abc\x00def")
    assert looks_binary(bytes(range(1, 32)) * 10)
    assert not looks_binary(CODE.encode())
    assert not looks_binary("naïve\tcode\r\n".encode())


def test_report_round_trips_through_a_dict(tmp_path):
    (tmp_path / "a.py").write_text(CODE)
    (tmp_path / "b.py").write_bytes(b"\x00" * 100)
    _, report = clean_dir(tmp_path)
    again = CleaningReport.from_dict(report.to_dict())
    assert again.summary() == report.summary()
