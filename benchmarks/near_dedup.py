"""Near-duplicate removal: codex-ml's MinHash LSH vs datatrove's MinHash deduplication, on the same corpus.

The corpus is the standard library's modules plus planted near-duplicates of a third of them: copies with
renamed identifiers, top-level functions reordered, comments edited. Both methods use word 5-gram shingles
an LSH shaped for threshold 0.7 with 256 permutations (datatrove: the bands x rows whose S-curve rises at
0.7, as it has no verification step; ours: candidates at 0.6, verified against 0.7 by their signatures), one
process each; datatrove splits words with the same regex as ours instead of spaCy (faster than spaCy, so
the comparison favours datatrove):

  datatrove     MinhashDedupSignature -> Buckets -> Cluster -> Filter on a LocalPipelineExecutor (1 task)
  codex-ml      codex_ml.data.safety.make_safe with near-dedup alone (num_workers=0)

The reference is the exact Jaccard similarity of every pair of documents (sparse shingle matrix product):
pairs at 0.7 or more are duplicates, their connected components the true clusters, and each cluster's
size minus one the documents a perfect method drops. Recall: the share of those a method dropped;
precision: the share of its drops that were such documents. The last line is our documents/s over
datatrove's, printed as 0 when our recall is below datatrove's.

    python benchmarks/near_dedup.py            # the whole standard library; about a minute on 2 cores
    python benchmarks/near_dedup.py --smoke    # 60 files; checks the script works
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from codex_ml.data.clean import CleaningConfig, CleaningReport, Document, clean_documents  # noqa: E402
from codex_ml.data.near_dedup import MinHashSettings, optimal_bands  # noqa: E402
from codex_ml.data.safety import SafetyReport, SafetySettings, make_safe  # noqa: E402
from codex_ml.data.sources import open_source  # noqa: E402

THRESHOLD, NUM_PERM, NGRAM = 0.7, 256, 5
_WORD = re.compile(r"\w+", re.ASCII)


def rename(text: str, rng: random.Random) -> str:
    names = sorted({w for w in re.findall(r"\b[a-z_][a-z0-9_]{4,}\b", text) if 2 <= text.count(w) <= 8})
    for w in rng.sample(names, min(3, len(names))):
        text = re.sub(rf"\b{w}\b", w + "_v2", text)
    return text


def reorder(text: str, rng: random.Random) -> str:
    parts = re.split(r"(?m)^(?=def |class )", text)
    head, blocks = parts[0], parts[1:]
    if len(blocks) > 2:
        i, j = rng.sample(range(len(blocks)), 2)
        blocks[i], blocks[j] = blocks[j], blocks[i]
    return head + "".join(blocks)


def edit_comments(text: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.lstrip().startswith("# ") and rng.random() < 0.3:
            lines[i] = line[: len(line) - len(line.lstrip())] + "# (edited) see above\n"
    return "".join(lines)


def corpus(limit: int | None, seed: int = 0) -> list[Document]:
    docs = list(clean_documents(open_source("stdlib", [], ["*.py"], "text", None), CleaningConfig(), CleaningReport()))
    docs = docs[:limit] if limit else docs
    rng = random.Random(seed)
    planted = []
    for d in docs[::3]:
        change = rng.choice([rename, reorder, edit_comments])
        planted.append(Document(f"planted/{change.__name__}/{d.id}", change(d.text, rng)))
    out = docs + planted
    rng.shuffle(out)
    return out


def true_clusters(docs: list[Document]) -> list[set[int]]:
    """Connected components of the pairs whose exact word 5-gram Jaccard similarity is >= THRESHOLD."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    vocab: dict[tuple, int] = {}
    rows, cols = [], []
    for i, d in enumerate(docs):
        w = _WORD.findall(d.text)
        ids = {vocab.setdefault(tuple(w[k : k + NGRAM]), len(vocab)) for k in range(len(w) - NGRAM + 1)}
        rows += [i] * len(ids)
        cols += list(ids)
    m = csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(docs), len(vocab)))
    sizes = np.asarray(m.sum(axis=1)).ravel()
    inter = (m @ m.T).tocoo()
    union = sizes[inter.row] + sizes[inter.col] - inter.data
    dup = (inter.row < inter.col) & (inter.data >= THRESHOLD * np.maximum(union, 1))
    graph = csr_matrix((np.ones(dup.sum()), (inter.row[dup], inter.col[dup])), shape=(len(docs), len(docs)))
    n, labels = connected_components(graph, directed=False)
    groups: dict[int, set[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, set()).add(i)
    return [g for g in groups.values() if len(g) > 1]


def score(kept_ids: set[str], docs: list[Document], clusters: list[set[int]]) -> tuple[float, float]:
    dropped = {i for i, d in enumerate(docs) if d.id not in kept_ids}
    should = sum(len(c) - 1 for c in clusters)
    # a drop is right when it is in a true cluster and the cluster keeps at least one member
    right = sum(min(len(c) - 1, len(c & dropped)) for c in clusters)
    return right / max(should, 1), right / len(dropped) if dropped else 1.0


def run_ours(docs: list[Document]) -> tuple[set[str], float]:
    settings = SafetySettings(redact=False, benchmarks=(), minhash=MinHashSettings(NGRAM, NUM_PERM, THRESHOLD))
    start = time.perf_counter()
    kept = make_safe(docs, settings, [], 0, SafetyReport(), [])
    return {d.id for d in kept}, time.perf_counter() - start


class RegexWords:
    """datatrove's word tokenizer for English is spaCy's; this one splits words as ours does, which is faster
    than spaCy (the comparison favours datatrove) and needs no spaCy."""

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)


def run_datatrove(docs: list[Document], work: Path) -> tuple[set[str], float]:
    from datatrove.data import Document as DtDocument
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from loguru import logger

    logger.remove()  # datatrove logs every step to stderr; the table is what matters here
    bands, rows = optimal_bands(THRESHOLD, NUM_PERM)
    config = MinhashConfig(n_grams=NGRAM, num_buckets=bands, hashes_per_bucket=rows)
    data = lambda: [DtDocument(text=d.text, id=d.id) for d in docs]  # noqa: E731
    kept: set[str] = set()

    def collect(stream, rank=0, world_size=1):
        for doc in stream:
            kept.add(doc.id)
            yield doc

    import datatrove.pipeline.dedup.minhash as dt_minhash
    import xxhash

    dt_minhash.load_word_tokenizer = lambda language: RegexWords()  # read in MinhashDedupSignature.__init__
    signatures = MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)
    # datatrove 0.10.1 hands xxhash a str, which xxhash 4 refuses: the same hash of the encoded shingle
    signatures._hash_func = lambda shingle: xxhash.xxh64_intdigest(shingle.encode())
    stages = [
        [data(), signatures],
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config)],
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=config)],
        [data(), MinhashDedupFilter(input_folder=str(work / "remove")), collect],
    ]
    tasks = [1, bands, 1, 1]
    start = time.perf_counter()
    for i, (pipeline, n) in enumerate(zip(stages, tasks)):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=1, logging_dir=str(work / f"logs{i}")).run()
    return kept, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="60 files: checks the script works")
    args = parser.parse_args()
    docs = corpus(60 if args.smoke else None)
    clusters = true_clusters(docs)
    mb = sum(len(d.text) for d in docs) / 1e6
    print(
        f"machine: {sys.platform}, python {sys.version.split()[0]}; corpus: {len(docs)} documents, {mb:.1f} MB, "
        f"{len(clusters)} true clusters, {sum(len(c) - 1 for c in clusters)} documents to drop"
    )
    with tempfile.TemporaryDirectory() as tmp:
        dt_kept, dt_s = run_datatrove(docs, Path(tmp))
    ours_kept, ours_s = run_ours(docs)
    rows = [("datatrove MinHash (4 stages, 1 process)", dt_kept, dt_s), ("codex-ml near_dedup (1 process)", ours_kept, ours_s)]
    print("| variant | documents/s | recall | precision | vs datatrove |")
    print("|---|---|---|---|---|")
    results = {}
    for name, kept, seconds in rows:
        recall, precision = score(kept, docs, clusters)
        results[name] = (len(docs) / seconds, recall)
        print(
            f"| {name} | {len(docs) / seconds:.0f} | {recall:.3f} | {precision:.3f} | "
            f"{(len(docs) / seconds) / (len(docs) / dt_s):.2f}x |"
        )
    (dt_rate, dt_recall), (our_rate, our_recall) = results[rows[0][0]], results[rows[1][0]]
    if our_recall < dt_recall:
        print(f"our recall {our_recall:.3f} is below datatrove's {dt_recall:.3f}: no speed-up claimed")
        print("ratio: 0")
    else:
        print(f"ratio: {our_rate / dt_rate:.2f}")


if __name__ == "__main__":
    main()
