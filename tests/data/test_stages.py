"""Stage 2 of prepare (``decide``) over spools: near-dedup decides as the in-memory safety stage does."""

import json
import random

import numpy as np
import pytest

from codex_ml.data import spool
from codex_ml.data.clean import CleaningConfig, Document
from codex_ml.data.near_dedup import INDEX_FILE, DedupIndex, MinHashSettings, write_index
from codex_ml.data.safety import SafetyReport, SafetySettings, make_safe
from codex_ml.data.sources import RawDocument
from codex_ml.data.stages import ScanSettings, decide, scan_shard
from helpers import stdlib_sample


def _corpus() -> list[tuple[str, str]]:
    """Standard-library modules with near-copies (some near the threshold) and the same texts under other ids."""
    rng = random.Random(11)
    docs = []
    for p in stdlib_sample(10):
        text = p.read_text()
        docs.append((f"m/{p.name}", text))
        for c in range(3):
            copy = "\n".join(line for line in text.splitlines() if rng.random() > (0.05 + 0.1 * c)) + f"\n# copy {c}\n"
            docs.append((f"c{c}/{p.name}", copy))
        docs.append((f"b/{p.name}", text))  # the same text: its id breaks the tie
    return docs


def _stage_two(docs, tmp_path, index_dir, settings) -> list[str]:
    """The ids decide keeps, the documents scanned into three spools."""
    spools = []
    for n in range(3):
        shard = docs[n::3]
        spools.append(tmp_path / f"spool-{n}")
        scan_shard([RawDocument(i, t.encode(), len(t)) for i, t in shard], settings, 0, spools[-1])
    decide(spools, settings, 0.1, "test corpus", tmp_path / "redactions.jsonl", index_dir)
    kept = []
    for directory in spools:
        for r, code in zip(spool.records(directory), spool.split_codes(directory)):
            if code != spool.DROPPED:
                kept.append(r.id)
    return kept


def test_near_dedup_over_spools_decides_as_in_memory(tmp_path):
    """A first run, then a second one where the documents kept of two modules are gone (their near-copies meet
    the index of the first) and one kept document has changed: the kept documents and the saved index are those
    of the in-memory safety stage (which tests check against a reference)."""
    safety = SafetySettings(redact=False, benchmarks=())
    settings = ScanSettings(CleaningConfig(dedup=False, skip_generated=False), safety)
    docs = _corpus()
    families = [{i for i, _ in docs if i.endswith(name)} for name in (docs[0][0][2:], docs[5][0][2:])]
    kept_before: set[str] = set()
    for run in range(2):
        if run:
            gone = {i for i in kept_before if any(i in f for f in families)}
            changed = sorted(kept_before - gone)[0]
            docs = [(i, t + "# changed\n" if i == changed else t) for i, t in docs if i not in gone]
        kept = _stage_two(docs, tmp_path / f"run{run}", tmp_path / "index-spools", settings)
        report = SafetyReport()
        by_memory = make_safe([Document(i, t) for i, t in docs], safety, [], 0, report, [], tmp_path / "index-memory")
        assert sorted(kept) == sorted(d.id for d in by_memory) and 10 < report.near_duplicates < len(docs) - 5
        assert _index(tmp_path / "index-spools") == _index(tmp_path / "index-memory")  # in another order
        kept_before = set(kept)
    # what is left of the two modules' documents was dropped against the index entries of the gone ones
    assert all(f - gone for f in families) and not any(f & kept_before for f in families)


def _index(directory):
    index = DedupIndex.load(directory, MinHashSettings())
    return sorted(zip(index.ids, index.keys, map(bytes, index.signatures)))


def test_index_is_written_a_chunk_at_a_time_and_read_back_whole(tmp_path):
    """The index streamed in chunks reads back as one; an index in the earlier array format still loads; a failed
    write leaves the previous index, and no half-written file, behind."""
    settings = MinHashSettings()
    rng = np.random.default_rng(0)
    signatures = rng.integers(0, 2**32, (10, settings.num_perm), dtype=np.uint32)
    ids, keys = [f"f{k}.py" for k in range(10)], [f"{k:064x}\0f{k}.py" for k in range(10)]
    chunks = [(ids[lo : lo + 4], keys[lo : lo + 4], signatures[lo : lo + 4]) for lo in range(0, 10, 4)]
    write_index(tmp_path, settings, 10, iter(chunks))
    index = DedupIndex.load(tmp_path, settings)
    assert (index.ids, index.keys) == (ids, keys) and np.array_equal(index.signatures, signatures)
    assert DedupIndex.load(tmp_path, MinHashSettings(num_perm=128)).ids == []  # other settings: none of it applies

    def broken():
        yield chunks[0]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_index(tmp_path, settings, 10, broken())
    assert [p.name for p in tmp_path.iterdir()] == [INDEX_FILE] and DedupIndex.load(tmp_path, settings).ids == ids
    with pytest.raises(ValueError, match="promised 11"):
        write_index(tmp_path, settings, 11, iter(chunks))

    old = tmp_path / "old"
    old.mkdir()
    meta = json.dumps({"settings": [settings.ngram, settings.num_perm, settings.threshold]})
    np.savez(old / INDEX_FILE, ids=np.array(ids), keys=np.array(keys), signatures=signatures, meta=np.array(meta))
    index = DedupIndex.load(old, settings)
    assert (index.ids, index.keys) == (ids, keys) and np.array_equal(index.signatures, signatures)
