"""tokenizer.train_bytes: the tokenizer trains on a bounded sample spread over the corpus."""

import random

from codex_ml.conf.schema import DataConfig, TokenizerConfig
from codex_ml.data.clean import Document
from codex_ml.recipes.prepare import prepare_data, tokenizer_sample


def test_sample_is_bounded_spread_and_order_independent():
    docs = [Document(f"pkg/m{i:03d}.py", f"# module {i}\n" + "x = 1\n" * 50) for i in range(200)]
    size = len(docs[0].text.encode())
    texts = tokenizer_sample(docs, 40 * size)
    assert 20 * size <= sum(len(t.encode()) for t in texts) <= 41 * size
    picked = {int(t.split()[2]) for t in texts}
    assert max(picked) > 150 and min(picked) < 50  # from the whole corpus, not its first files
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert sorted(tokenizer_sample(shuffled, 40 * size)) == sorted(texts)
    assert tokenizer_sample(docs, 10**9) == [d.text for d in docs]


def test_prepare_trains_on_the_sample(corpus_dir):
    logs = []
    data = DataConfig(source="files", paths=[str(corpus_dir)], num_workers=0, redact=False, near_dedup=False, decontaminate=[])
    prepare_data(data, TokenizerConfig(vocab_size=400, train_bytes=100_000), log=logs.append)
    line = next(m for m in logs if m.startswith("tokenizer: training"))
    assert "a sample of" in line and "tokenizer.train_bytes=100,000" in line
