"""The spool of a scanned shard: signatures read back on demand equal the rows written."""

import numpy as np
import pytest

from codex_ml.data.near_dedup import cluster_keep
from codex_ml.data.spool import Record, SpoolSignatures, SpoolWriter


@pytest.fixture
def spools(tmp_path, monkeypatch):
    """Three spools (one without signatures) and some of their signature rows, with gaps wider than a chunk;
    every third signature a near-copy of the one before."""
    monkeypatch.setattr(SpoolSignatures, "CHUNK_ROWS", 7)
    rng = np.random.default_rng(0)
    dirs, picked, spool_of, rows = [], [], [], []
    for n, count in enumerate([60, 0, 25]):
        writer = SpoolWriter(tmp_path / f"spool-{n}")
        written, signature = 0, None
        for i in range(count):
            if i % 3 == 2 and signature is not None:
                signature = signature.copy()
                signature[rng.integers(0, 16)] += 1
            else:
                signature = rng.integers(0, 2**32, 16, dtype=np.uint32) if i % 5 else None  # some records unsigned
            writer.add(Record(f"{n}/{i}"), "text", signature)
            if signature is not None:
                if not 20 <= i < 40:  # rows 16..31 left out: a gap of more than two chunks
                    picked.append(signature)
                    spool_of.append(n)
                    rows.append(written)
                written += 1
        writer.close()
        dirs.append(tmp_path / f"spool-{n}")
    source = SpoolSignatures(dirs, np.array(spool_of, dtype=np.int64), np.array(rows, dtype=np.int64), 16)
    return source, np.stack(picked)


def test_spool_signatures_give_the_bands_and_rows_an_array_holds(spools):
    source, expected = spools
    assert source.shape == expected.shape
    for start, stop in [(0, 8), (8, 16), (3, 4)]:
        assert np.array_equal(source.band(start, stop), expected[:, start:stop])
    indices = np.random.default_rng(1).integers(0, len(expected), 50)  # unsorted, repeated, across spools
    assert np.array_equal(source.rows(indices), expected[indices])
    assert source.rows(np.zeros(0, dtype=np.int64)).shape == (0, 16)


def test_clusters_from_spools_equal_those_from_memory(spools):
    source, expected = spools
    keys = [str(k) for k in range(len(expected))]
    in_memory = cluster_keep(expected, keys, 0.7)
    assert (~in_memory.keep).sum() > 5
    from_spools = cluster_keep(source, keys, 0.7)
    assert np.array_equal(from_spools.keep, in_memory.keep) and from_spools.kept_instead == in_memory.kept_instead
