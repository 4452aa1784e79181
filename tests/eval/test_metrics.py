"""The metrics registry: each metric against its reference library or hand-computed values, extension, bootstrap, errors."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from codex_ml.errors import CodexError
from codex_ml.eval import metrics
from codex_ml.eval.metrics import (
    available_metrics,
    bootstrap_ci,
    code_tokens,
    compute_metrics,
    get_metric,
    register_metric,
)

# Four completions checked by hand below.
PREDICTIONS = ["return a + b", "def f(x):\n    return x*2", "print('hi')", "x = [i for i in range(10)]"]
REFERENCES = ["return a + b\n", "def f(y):\n    return y * 2", 'print("hello")', "x = list(range(10))"]

# A larger corpus for the library comparisons: real-looking lines and imperfect "predictions" of them.
CODE = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i)",
    "import os\npath = os.path.join(root, name)",
    "with open(path) as f:\n    data = f.read()",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y",
    "if x is None:\n    raise ValueError('x is required')",
    "result = [n * n for n in numbers if n % 2 == 0]",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = 0",
    "return sorted(items, key=lambda item: item.name)",
    "counts = collections.Counter(words).most_common(10)",
    "assert len(batch) == batch_size, 'short batch'",
    "while queue:\n    node = queue.pop()\n    visit(node)",
]
GENERATED = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i + 1)",
    "import os\npath = os.path.join(name, root)",
    "with open(path) as fh:\n    data = fh.read()",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x",
    "if x is None:\n    raise TypeError('x')",
    "result = [n for n in numbers if n % 2]",
    "value = int(text)",
    "return sorted(items)",
    "counts = Counter(words).most_common(5)",
    "assert len(batch) == batch_size",
    "while True:\n    pass",
]


@pytest.fixture
def scratch_registry(monkeypatch):
    """Metrics registered in a test vanish after it."""
    monkeypatch.setattr(metrics, "_METRICS", dict(metrics._METRICS))


def test_the_builtin_metrics_are_registered():
    assert set(available_metrics()) >= {
        "exact_match",
        "token_f1",
        "bleu",
        "chrf",
        "rouge_l",
        "distinct_1",
        "distinct_2",
        "perplexity",
        "accuracy",
    }
    assert available_metrics() == sorted(available_metrics())
    assert get_metric("exact_match").per_sample and not get_metric("distinct_1").per_sample
    assert get_metric("perplexity").inputs == ("losses", "token_counts")
    assert get_metric("perplexity").required == ("losses",)


def test_exact_match_ignores_only_surrounding_whitespace():
    assert metrics.exact_match(PREDICTIONS, REFERENCES) == [1.0, 0.0, 0.0, 0.0]
    assert metrics.exact_match(["  x = 1\n"], ["x = 1"]) == [1.0]
    assert metrics.exact_match(["x = 1"], ["x=1"]) == [0.0]
    assert metrics.exact_match(["X = 1"], ["x = 1"]) == [0.0]
    assert compute_metrics(["exact_match"], predictions=PREDICTIONS, references=REFERENCES) == {"exact_match": 0.25}


def test_code_tokens_split_identifiers_numbers_and_each_punctuation_character():
    assert code_tokens("def f(x_1):\n    return x_1*2.5 >= y") == [
        "def",
        "f",
        "(",
        "x_1",
        ")",
        ":",
        "return",
        "x_1",
        "*",
        "2",
        ".",
        "5",
        ">",
        "=",
        "y",
    ]
    assert code_tokens("  \n") == []


def test_token_f1_matches_hand_computed_values():
    # 2: 8 of 10 tokens shared both ways; 3: print ( ) shared of 6 and 6;
    # 4: x = range ( 10 ) shared, 6 of 12 predicted and 6 of 9 referenced: F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7
    expected = [1.0, 0.8, 0.5, 4 / 7]
    assert metrics.token_f1(PREDICTIONS, REFERENCES) == pytest.approx(expected)
    assert compute_metrics("token_f1", predictions=PREDICTIONS, references=REFERENCES)["token_f1"] == pytest.approx(
        np.mean(expected)
    )
    assert metrics.token_f1(["", "", "a"], ["", "a", "b"]) == [1.0, 0.0, 0.0]
    assert metrics.token_f1(["a a b"], ["a b b"]) == pytest.approx([2 / 3])  # bags, not sets


def test_bleu_and_chrf_equal_sacrebleu():
    got = compute_metrics(["bleu", "chrf"], predictions=GENERATED, references=CODE)
    assert got["bleu"] == sacrebleu.corpus_bleu(GENERATED, [CODE]).score
    assert got["chrf"] == sacrebleu.corpus_chrf(GENERATED, [CODE]).score
    assert 20 < got["bleu"] < 90 and 20 < got["chrf"] < 90  # a fixture that exercises partial matches
    assert compute_metrics(["bleu"], predictions=CODE, references=CODE)["bleu"] == pytest.approx(100.0)
    for n in (1, 2, 5):  # small corpora too, where smoothing and the brevity penalty decide
        got = compute_metrics(["bleu", "chrf"], predictions=GENERATED[-n:], references=CODE[-n:])
        assert got == {
            "bleu": sacrebleu.corpus_bleu(GENERATED[-n:], [CODE[-n:]]).score,
            "chrf": sacrebleu.corpus_chrf(GENERATED[-n:], [CODE[-n:]]).score,
        }


def test_rouge_l_equals_rouge_score_averaged_over_samples():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(GENERATED, CODE)]
    assert metrics.rouge_l(GENERATED, CODE) == expected
    assert compute_metrics(["rouge_l"], predictions=GENERATED, references=CODE)["rouge_l"] == pytest.approx(np.mean(expected))


def test_distinct_n_counts_ngrams_within_each_prediction():
    preds = ["a b a b", "a ( b )"]
    # unigrams: 8, of which a b ( ) are distinct; bigrams: ab ba ab | a( (b b) -> 5 distinct of 6 (no "b a" across samples)
    got = compute_metrics(["distinct_1", "distinct_2", "distinct_3"], predictions=preds)
    assert got == {"distinct_1": 0.5, "distinct_2": pytest.approx(5 / 6), "distinct_3": 1.0}
    assert metrics.distinct_n(preds, 4) == 1.0
    assert metrics.distinct_n(["a"], 2) == 0.0  # no bigram at all
    with pytest.raises(CodexError, match="n >= 1"):
        metrics.distinct_n(preds, 0)


def test_perplexity_is_exp_of_token_weighted_mean_loss():
    # per-sample mean losses 2.0 over 3 tokens and 1.0 over 1 token: (6 + 1) / 4 = 1.75 nats per token
    assert compute_metrics(["perplexity"], losses=[2.0, 1.0], token_counts=[3, 1])["perplexity"] == pytest.approx(math.exp(1.75))
    # per-token losses: each counts once
    assert compute_metrics(["perplexity"], losses=[1.0, 2.0, 3.0])["perplexity"] == pytest.approx(math.exp(2.0))
    assert math.isnan(metrics.perplexity([1.0], [0]))
    assert metrics.perplexity([1e6], [1]) == math.exp(700.0)  # finite, like eval.loss
    with pytest.raises(CodexError, match=">= 0"):
        metrics.perplexity([1.0, 2.0], [1, -1])


def test_accuracy_of_equality_or_of_booleans():
    assert compute_metrics(["accuracy"], predictions=[1, 2, 3, 4], references=[1, 2, 0, 4]) == {"accuracy": 0.75}
    assert compute_metrics(["accuracy"], predictions=[True, False, True, True]) == {"accuracy": 0.75}
    assert compute_metrics(["accuracy"], predictions=np.array([True, False])) == {"accuracy": 0.5}
    with pytest.raises(CodexError, match="booleans"):
        compute_metrics(["accuracy"], predictions=[1, 0])


def test_compute_metrics_takes_each_metric_its_own_inputs():
    got = compute_metrics(
        ["exact_match", "distinct_1", "perplexity"],
        predictions=PREDICTIONS,
        references=REFERENCES,
        losses=[2.0, 1.0],
        token_counts=[3, 1],
    )
    assert got["exact_match"] == 0.25 and got["perplexity"] == pytest.approx(math.exp(1.75))
    assert all(isinstance(v, float) for v in got.values())


def test_a_new_metric_is_one_decorated_function(scratch_registry):
    @register_metric("length_ratio", per_sample=True)
    def length_ratio(predictions: list[str], references: list[str]) -> list[float]:
        return [len(p) / len(r) for p, r in zip(predictions, references)]

    @register_metric("pass_rate")
    def pass_rate(passed: list[bool]) -> float:  # a corpus metric with an input of its own
        return sum(passed) / len(passed)

    def overall_ratio(rows: np.ndarray) -> float:
        return rows[:, 0].sum() / rows[:, 1].sum()

    @register_metric("char_ratio", per_sample=True, reduce=overall_ratio)  # per-sample rows, reduced at the end
    def char_counts(predictions: list[str], references: list[str]) -> list[tuple[int, int]]:
        return [(len(p), len(r)) for p, r in zip(predictions, references)]

    assert length_ratio(["ab"], ["abcd"]) == [0.5]  # the function itself is unchanged
    assert {"length_ratio", "pass_rate"} <= set(available_metrics())
    got = compute_metrics(
        ["length_ratio", "char_ratio", "pass_rate"],
        predictions=["ab", "abcd"],
        references=["abcd", "abcd"],
        passed=[True, False, True, True],
        ci=0.9,
        n_resamples=50,
    )
    assert got["length_ratio"] == 0.75 and got["char_ratio"] == 6 / 8 and got["pass_rate"] == 0.75
    assert got["char_ratio_ci_low"] <= 0.75 <= got["char_ratio_ci_high"]
    assert got["pass_rate_ci_low"] <= 0.75 <= got["pass_rate_ci_high"]
    with pytest.raises(CodexError, match="already registered"):
        register_metric("exact_match")(length_ratio)
    with pytest.raises(CodexError, match="per_sample=True"):
        register_metric("total", reduce=np.sum)
    with pytest.raises(CodexError, match=r"\*args or \*\*kwargs"):
        register_metric("anything")(lambda **inputs: 0.0)


def test_the_scratch_registry_does_not_leak():
    assert "length_ratio" not in available_metrics()


def test_bootstrap_ci_is_seeded_contains_the_estimate_and_narrows_with_more_samples():
    rng = np.random.default_rng(123)
    small, large = rng.random(20) < 0.6, rng.random(2000) < 0.6
    low, high = bootstrap_ci(small, seed=7)
    assert (low, high) == bootstrap_ci(small, seed=7)
    assert (low, high) != bootstrap_ci(small, seed=8)
    assert low <= small.mean() <= high
    large_low, large_high = bootstrap_ci(large, n_resamples=300, seed=7)
    assert large_low <= large.mean() <= large_high
    assert large_high - large_low < (high - low) / 3
    assert bootstrap_ci(small, ci=0.5) != bootstrap_ci(small, ci=0.99)
    wide, narrow = bootstrap_ci(small, ci=0.99), bootstrap_ci(small, ci=0.5)
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    assert bootstrap_ci(small, statistic=np.median, n_resamples=100) == bootstrap_ci(small, statistic=np.median, n_resamples=100)


def test_compute_metrics_intervals_for_per_sample_and_corpus_metrics():
    got = compute_metrics(
        ["exact_match", "token_f1", "bleu", "distinct_2"],
        predictions=GENERATED,
        references=CODE,
        ci=0.95,
        seed=3,
        n_resamples=200,
    )
    scores = metrics.exact_match(GENERATED, CODE)
    assert (got["exact_match_ci_low"], got["exact_match_ci_high"]) == bootstrap_ci(scores, ci=0.95, n_resamples=200, seed=3)
    for name in ("exact_match", "token_f1", "bleu"):
        assert got[f"{name}_ci_low"] <= got[name] <= got[f"{name}_ci_high"], name
        assert got[f"{name}_ci_low"] < got[f"{name}_ci_high"], name
    # resampling with replacement repeats predictions, which lowers distinct-n by itself: no interval for it
    assert "distinct_2_ci_low" not in got and not get_metric("distinct_2").bootstrap
    again = compute_metrics(["bleu"], predictions=GENERATED, references=CODE, ci=0.95, seed=3, n_resamples=200)
    assert again == {k: got[k] for k in again}
    assert set(compute_metrics(["bleu"], predictions=GENERATED, references=CODE, ci=0)) == {"bleu"}


def test_bad_input_is_a_codex_error_that_says_what_is_allowed():
    with pytest.raises(CodexError, match="unknown metric 'blue'; available metrics: accuracy, bleu, chrf"):
        compute_metrics(["blue"], predictions=["a"], references=["a"])
    with pytest.raises(CodexError, match="available metrics: .*exact_match"):
        get_metric("nope")
    with pytest.raises(CodexError, match="differ in length: predictions=2, references=1"):
        compute_metrics(["exact_match"], predictions=["a", "b"], references=["a"])
    with pytest.raises(CodexError, match="differ in length: 2 vs 1"):
        metrics.rouge_l(["a", "b"], ["a"])  # called directly, too
    with pytest.raises(CodexError, match="needs input.* references"):
        compute_metrics(["bleu"], predictions=["a"])
    with pytest.raises(CodexError, match="unknown metric input.* reference; metrics take: .*references"):
        compute_metrics(["bleu"], predictions=["a"], reference=["a"])
    with pytest.raises(CodexError, match="must be a sequence"):
        compute_metrics(["bleu"], predictions="a", references="a")
    with pytest.raises(CodexError, match="must be strings.*int"):
        compute_metrics(["token_f1"], predictions=["a", 1], references=["a", "b"])
    with pytest.raises(CodexError, match="no samples"):
        compute_metrics(["exact_match"], predictions=[], references=[])
    with pytest.raises(CodexError, match="ci must be"):
        compute_metrics(["distinct_1"], predictions=["a"], ci=95)
    with pytest.raises(CodexError, match="ci must be"):
        bootstrap_ci([1.0], ci=1.0)
    with pytest.raises(CodexError, match="non-empty"):
        bootstrap_ci([])


def test_metrics_stay_a_lower_layer_and_quiet(capsys, caplog):
    compute_metrics(available_metrics(), predictions=GENERATED, references=CODE, losses=[1.0] * len(CODE))
    compute_metrics(["bleu"], predictions=["x = 1 ."] * 100, references=["x = 2 ."] * 100)  # sacrebleu would warn here
    assert capsys.readouterr() == ("", "") and caplog.records == []
    code = (
        "import sys, codex_ml.eval.metrics; "
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['codex_ml', 'training'], ['codex_ml', 'recipes'], ['codex_ml', 'serve'], ['codex_ml', 'cli'])))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
