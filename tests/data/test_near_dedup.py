"""Near-duplicate removal: MinHash estimates against exact Jaccard, deterministic clusters, the persisted index."""

import random
import re

import numpy as np
import pytest

from codex_ml.data.clean import Document
from codex_ml.data.near_dedup import MinHasher, MinHashSettings, cluster_keep, content_key, optimal_bands
from codex_ml.data.safety import SafetyReport, SafetySettings, make_safe
from helpers import stdlib_sample


def shingles(text, n=5):
    """The reference: word 5-gram sets with plain Python, independent of the numpy implementation."""
    words = re.findall(r"\w+", text, re.ASCII)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a, b):
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def edited(text, rng, drop=0.15):
    return "\n".join(line for line in text.splitlines() if rng.random() > drop)


def test_signature_estimates_exact_jaccard():
    hasher = MinHasher(MinHashSettings())
    rng = random.Random(1)
    errors = []
    for p in stdlib_sample(20):
        a = p.read_text()
        b = edited(a, rng)
        estimate = (hasher.signature(a) == hasher.signature(b)).mean()
        errors.append(estimate - jaccard(a, b))
    # 256 permutations: the standard error of the estimate is at most 0.5 / sqrt(256) = 0.031
    assert abs(np.mean(errors)) < 0.02 and np.max(np.abs(errors)) < 0.1, errors
    texts = [p.read_text() for p in stdlib_sample(6)]
    unrelated = [(hasher.signature(x) == hasher.signature(y)).mean() for x, y in zip(texts, texts[1:])]
    assert max(unrelated) < 0.2
    assert hasher.signature("too few words") is None
    assert np.array_equal(hasher.signature(texts[0]), MinHasher(MinHashSettings()).signature(texts[0]))


def test_bands_follow_the_threshold():
    assert optimal_bands(0.7, 256)[0] * optimal_bands(0.7, 256)[1] <= 256
    b, r = optimal_bands(0.7, 256)
    assert 0.6 < (1 / b) ** (1 / r) < 0.8  # where the S-curve rises
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        MinHasher(MinHashSettings(threshold=1.0))


def _docs():
    rng = random.Random(4)
    docs = []
    for i, p in enumerate(stdlib_sample(12)):
        text = p.read_text()
        docs.append(Document(f"orig/{p.name}", text))
        if i < 4:
            copy = edited(text, rng, 0.03) + "\n# a comment of the copy\n"
            assert jaccard(text, copy) > 0.8  # a near-duplicate by the reference measure
            docs.append(Document(f"copy/{p.name}", copy))
    return docs


def test_one_document_per_cluster_independent_of_order():
    settings = SafetySettings(redact=False, benchmarks=())
    docs = _docs()
    kept = make_safe(docs, settings, [], 0, report := SafetyReport(), [])
    assert report.near_duplicates == 4 and len(kept) == 12
    shuffled = docs[:]
    random.Random(9).shuffle(shuffled)
    kept2 = make_safe(shuffled, settings, [], 0, SafetyReport(), [])
    assert sorted(d.id for d in kept) == sorted(d.id for d in kept2)
    # the kept member of each cluster is the one with the smaller content hash
    by_name = {}
    for d in docs:
        by_name.setdefault(d.id.split("/")[1], []).append(d)
    for members in (m for m in by_name.values() if len(m) == 2):
        winner = min(members, key=lambda d: content_key(d.id, d.text))
        assert winner.id in {d.id for d in kept}


def test_index_dedups_later_files_against_earlier_runs(tmp_path):
    settings = SafetySettings(redact=False, benchmarks=())
    docs = [d for d in _docs() if d.id.startswith("orig/")]
    first = make_safe(docs[:8], settings, [], 0, SafetyReport(), [], tmp_path / "index")
    assert len(first) == 8
    # later: the same folders plus a near-copy of an earlier file and a new distinct file
    rng = random.Random(2)
    near = Document("new/near.py", edited(docs[0].text, rng, 0.05))
    later = docs[:8] + [near, docs[9]]
    kept = make_safe(later, settings, [], 0, report := SafetyReport(), [], tmp_path / "index")
    assert [d.id for d in kept] == [d.id for d in docs[:8]] + [docs[9].id] and report.near_duplicates == 1
    # an earlier file since removed from the corpus still blocks its near-copy
    kept = make_safe(docs[1:8] + [near], settings, [], 0, SafetyReport(), [], tmp_path / "index")
    assert near.id not in {d.id for d in kept}


def test_cluster_keep_prefers_prior_documents():
    sig = np.arange(256, dtype=np.uint32)
    sigs = np.stack([sig, sig, sig[::-1].copy()])
    result = cluster_keep(sigs, ["b", "a", "c"], 0.7, prior=np.array([True, False, False]))
    assert result.keep.tolist() == [True, False, True] and result.kept_instead == {1: 0}


def test_borderline_estimates_are_decided_by_the_exact_similarity():
    """A pair whose signatures agree on 0.68 of their entries (within 3 standard deviations of 0.7) is
    decided by the exact similarity when the texts are at hand; a clear estimate is not second-guessed."""
    base = np.arange(256, dtype=np.uint32)
    near = base.copy()
    near[: 256 - 174] += 1000  # agree on 174 of 256 = 0.68
    far = base.copy()
    far[128:] += 2000  # agree on 0.5 with the first (0.18 with the second): outside the border
    asked = []

    def exact(i: int, j: int) -> float | None:
        asked.append((i, j))
        return {(0, 1): 0.72, (0, 2): 0.99}.get((i, j))

    sigs = np.stack([base, near, far])
    keys = ["a", "b", "c"]
    assert cluster_keep(sigs, keys, 0.7).keep.tolist() == [True, True, True]  # the estimate alone: 0.68 < 0.7
    assert cluster_keep(sigs, keys, 0.7, exact=exact).keep.tolist() == [True, False, True]
    assert (0, 2) not in asked  # 0.5 is no borderline case, whatever the exact figure would say
    assert cluster_keep(sigs, keys, 0.7, exact=lambda i, j: None).keep.tolist() == [True, True, True]  # no text


def test_exact_verification_catches_pairs_the_estimate_misses():
    """Edited copies of standard-library modules: every pair at or above 0.7 exactly is found with the texts,
    and none below it is merged."""
    from codex_ml.data.near_dedup import jaccard as set_jaccard
    from codex_ml.data.near_dedup import shingle_set

    hasher, rng = MinHasher(MinHashSettings()), random.Random(7)
    docs = []
    for k, p in enumerate(stdlib_sample(12)):
        a = p.read_text()
        docs += [Document(f"{k}a", a), Document(f"{k}b", edited(a, rng))]
    sigs = np.stack([hasher.signature(d.text) for d in docs])
    sets = [shingle_set(hasher, d.text) for d in docs]
    result = cluster_keep(sigs, [content_key(d.id, d.text) for d in docs], 0.7, exact=lambda i, j: set_jaccard(sets[i], sets[j]))
    for k in range(0, len(docs), 2):
        similar = set_jaccard(sets[k], sets[k + 1]) >= 0.7
        assert int(result.keep[k]) + int(result.keep[k + 1]) == (1 if similar else 2), (docs[k].id, similar)


def _reference_cluster_keep(signatures, content_keys, threshold, prior, exact):
    """cluster_keep as it was before it went band by band: every band's candidate pairs at once, each verified,
    joined one by one, the winner of each component picked in a Python loop."""
    from codex_ml.data.near_dedup import BORDER_SIGMAS, CANDIDATE_MARGIN, _mix

    n, num_perm = signatures.shape
    bands, rows = optimal_bands(max(threshold - CANDIDATE_MARGIN, 0.05), num_perm)
    multipliers = _mix(np.arange(1, rows + 1, dtype=np.uint64))
    edges = []
    for b in range(bands):
        band = signatures[:, b * rows : (b + 1) * rows].astype(np.uint64)
        keys = _mix((band * multipliers).sum(axis=1, dtype=np.uint64) ^ np.uint64(b))
        order = np.argsort(keys, kind="stable")
        same = keys[order[1:]] == keys[order[:-1]]
        run_start = np.maximum.accumulate(np.where(np.concatenate(([True], ~same)), np.arange(n), 0))
        idx = np.flatnonzero(same) + 1
        edges.append(np.stack([order[idx - 1], order[idx]], axis=1))
        edges.append(np.stack([order[run_start[idx]], order[idx]], axis=1))
    pairs = np.unique(np.sort(np.concatenate(edges), axis=1), axis=0)
    agree = (signatures[pairs[:, 0]] == signatures[pairs[:, 1]]).mean(axis=1)
    edge = agree >= threshold
    border = BORDER_SIGMAS * np.sqrt(threshold * (1.0 - threshold) / num_perm)
    for k in np.flatnonzero(np.abs(agree - threshold) < border):
        similarity = exact(int(pairs[k, 0]), int(pairs[k, 1]))
        if similarity is not None:
            edge[k] = similarity >= threshold
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in pairs[edge]:
        ri, rj = find(int(i)), find(int(j))
        parent[max(ri, rj)] = min(ri, rj)
    winner = {}
    for i in range(n):
        r = find(i)
        if r not in winner or (not prior[i], content_keys[i]) < (not prior[winner[r]], content_keys[winner[r]]):
            winner[r] = i
    keep = np.array([winner[find(i)] == i for i in range(n)])
    return keep, {i: winner[find(i)] for i in range(n) if winner[find(i)] != i}


def _planted_signatures(rng, originals, copies, num_perm=256):
    """Random signatures, each with ``copies`` near-copies (and copies of copies) whose agreement with their
    source is spread over 0.5..0.95, around the threshold; a few exact copies."""
    sigs = [rng.integers(0, 2**32, num_perm, dtype=np.uint32) for _ in range(originals)]
    for k in range(originals * copies):
        source = sigs[k % originals] if rng.random() < 0.6 else sigs[int(rng.integers(len(sigs)))]
        copy = source.copy()
        changed = rng.random(num_perm) < rng.uniform(0.05, 0.5)
        copy[changed] = rng.integers(0, 2**32, int(changed.sum()), dtype=np.uint32)
        sigs.append(copy)
    sigs += [sigs[int(i)].copy() for i in rng.integers(0, len(sigs), 20)]
    return np.stack(sigs)[rng.permutation(len(sigs))]


@pytest.mark.parametrize("batch", [8192, 5])
def test_cluster_keep_band_by_band_equals_the_all_pairs_reference(monkeypatch, batch):
    """Planted clusters around the threshold, ties of content keys, prior documents and an exact callback that
    overturns some borderline estimates and knows nothing of others: the same documents kept and the same winners,
    with verification batches as large as in use and so small that a band takes many."""
    import codex_ml.data.near_dedup as near_dedup

    monkeypatch.setattr(near_dedup, "VERIFY_BATCH", batch)
    rng = np.random.default_rng(3)
    sigs = _planted_signatures(rng, 150, 8)
    n = len(sigs)
    keys = [f"{int(k):03d}" for k in rng.integers(0, 400, n)]  # some equal: ties go to the first document
    prior = rng.random(n) < 0.05

    def exact(i, j):
        assert i < j
        code = (i * 1_000_003 + j) % 101
        return None if code % 4 == 0 else code / 100

    keep, kept_instead = _reference_cluster_keep(sigs, keys, 0.7, prior, exact)
    assert 0.3 * n < (~keep).sum() < 0.95 * n  # the planted clusters are found, not merged into one
    result = cluster_keep(sigs, keys, 0.7, prior, exact)
    assert np.array_equal(result.keep, keep) and result.kept_instead == kept_instead
    # as ranks, and through a stacked source of two parts: the same
    ranks = np.empty(n, dtype=np.int64)
    ranks[sorted(range(n), key=keys.__getitem__)] = np.arange(n)
    stacked = near_dedup.StackedSignatures([near_dedup.ArraySignatures(sigs[:100]), near_dedup.ArraySignatures(sigs[100:])])
    again = cluster_keep(stacked, ranks, 0.7, prior, exact)
    assert np.array_equal(again.keep, keep) and again.kept_instead == kept_instead


def test_content_ranks_follow_content_keys():
    """Digests sort as their hex does (trailing zero bytes included), equal ones by id, and ids are read only
    for those."""
    from codex_ml.data.near_dedup import content_ranks

    rng = np.random.default_rng(5)
    digests = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    digests[5:10] = digests[5]  # a shared prefix, then zero bytes to the end, or a one among them
    digests[5:10, 20:] = 0
    digests[6, 31] = digests[7, 30] = digests[8, 25] = 1
    digests[12] = digests[30] = digests[31] = digests[3]  # the same text under other ids
    ids = [f"doc{int(k)}" for k in rng.integers(0, 1000, 40)]
    asked = []

    def ids_of(positions):
        asked.extend(positions.tolist())
        return [ids[j] for j in positions]

    ranks = content_ranks(digests, ids_of)
    strings = [bytes(d).hex() + "\0" + i for d, i in zip(digests, ids)]
    assert sorted(range(40), key=ranks.__getitem__) == sorted(range(40), key=strings.__getitem__)
    assert sorted(asked) == [3, 5, 9, 12, 30, 31]


def test_cluster_keep_memory_stays_a_few_numbers_a_document(monkeypatch):
    """20,000 documents in clusters of about 200 near-copies each: the peak of what clustering allocates stays
    under 400 bytes a document (about 190 today; the all-pairs clustering took 8.7 KB), with verification
    batches small enough (512 pairs) that their fixed 1 MB does not hide what grows with the documents."""
    import tracemalloc

    import codex_ml.data.near_dedup as near_dedup

    monkeypatch.setattr(near_dedup, "VERIFY_BATCH", 512)
    n, rng = 20_000, np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, (n // 200, 256), dtype=np.uint32)[rng.integers(0, n // 200, n)]
    changed = rng.random(sigs.shape) < rng.uniform(0.02, 0.12, n)[:, None]
    sigs[changed] = rng.integers(0, 2**32, int(changed.sum()), dtype=np.uint32)
    del changed
    tracemalloc.start()
    try:
        result = cluster_keep(sigs, np.arange(n), 0.7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.keep.sum() == n // 200  # every cluster found whole
    assert peak < 400 * n, f"{peak / n:.0f} bytes a document"
