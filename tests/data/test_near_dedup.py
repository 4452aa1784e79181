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
