"""Text metrics in a small registry: each metric is one decorated function, plus bootstrap confidence intervals.

A metric declares its inputs by its parameter names (``predictions``, ``references``, ``losses``,
``token_counts``, or any other); ``compute_metrics`` hands each metric the inputs it takes. Every input is
a sequence with one entry per sample. A *per-sample* metric returns one score per sample and its value is
their mean, or one row of statistics per sample that its ``reduce`` turns into the value (BLEU and chrF sum
sacrebleu's statistics); a *corpus* metric returns one float for the whole corpus (distinct-n, perplexity).
Per-sample rows make bootstrap intervals cheap: resample the rows, reduce again.

Metrics are pure: they never read files, print or log.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from codex_ml.errors import CodexError

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer


@dataclass(frozen=True)
class Metric:
    """A registered metric: its function, whether it scores each sample, the inputs it takes, whether it gets intervals."""

    name: str
    fn: Callable[..., Any]
    per_sample: bool
    reduce: Callable[[np.ndarray], float]  # per-sample rows -> the metric's value; np.mean unless registered otherwise
    bootstrap: bool  # whether compute_metrics(ci=...) gives it a bootstrap interval
    inputs: tuple[str, ...]  # every parameter of ``fn``, in order
    required: tuple[str, ...]  # the parameters without a default


_METRICS: dict[str, Metric] = {}


def register_metric(
    name: str,
    *,
    per_sample: bool = False,
    reduce: Callable[[np.ndarray], float] | None = None,
    bootstrap: bool = True,
) -> Callable[[Callable], Callable]:
    """Register the decorated function as metric ``name`` and return the function unchanged.

    ``per_sample=True``: the function returns one float per sample and the metric is their mean, or, with
    ``reduce``, one row of numbers per sample and the metric is ``reduce(rows)`` (an array, samples first).
    Otherwise the function returns one float for the corpus. ``bootstrap=False`` for a metric that resampling
    with replacement would bias (repeated samples lower distinct-n by themselves).
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise CodexError(f"a metric name must be a non-empty string without spaces, got {name!r}")
    if reduce is not None and not per_sample:
        raise CodexError(f"metric {name!r}: reduce applies to per-sample rows; register it with per_sample=True")

    def decorate(fn: Callable) -> Callable:
        if name in _METRICS:
            raise CodexError(f"metric {name!r} is already registered; available metrics: {', '.join(available_metrics())}")
        params = list(inspect.signature(fn).parameters.values())
        variadic = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if variadic or not params:
            raise CodexError(
                f"metric {name!r}: its function must name each input it takes as a parameter "
                f"(no *args or **kwargs), got {fn.__name__}{inspect.signature(fn)}"
            )
        _METRICS[name] = Metric(
            name=name,
            fn=fn,
            per_sample=per_sample,
            reduce=reduce or np.mean,
            bootstrap=bootstrap,
            inputs=tuple(p.name for p in params),
            required=tuple(p.name for p in params if p.default is p.empty),
        )
        return fn

    return decorate


def get_metric(name: str) -> Metric:
    """The registered metric ``name``."""
    if name not in _METRICS:
        raise CodexError(f"unknown metric {name!r}; available metrics: {', '.join(available_metrics())}")
    return _METRICS[name]


def available_metrics() -> list[str]:
    """The names of the registered metrics, sorted."""
    return sorted(_METRICS)


def compute_metrics(
    names: Iterable[str] | str,
    *,
    ci: float | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    **inputs: Sequence,
) -> dict[str, float]:
    """Compute the metrics ``names`` on ``inputs`` (``predictions=``, ``references=``, ``losses=``, ...).

    With ``ci`` (e.g. 0.95; ``None`` or 0 turns it off) every metric registered with ``bootstrap=True`` (all but
    distinct-n) also gets a seeded percentile bootstrap interval as ``<name>_ci_low`` and ``<name>_ci_high``:
    per-sample scores (or rows) are resampled and reduced again; a corpus metric is recomputed on each resample
    of the samples (``n_resamples`` calls of it). The same ``seed`` draws the same resamples for every metric.
    """
    names = [names] if isinstance(names, str) else list(names)
    metrics = [get_metric(name) for name in names]
    if ci and not 0 < ci < 1:
        raise CodexError(f"ci must be a confidence level between 0 and 1 (e.g. 0.95), or 0 for none; got {ci}")
    known_inputs = {i for m in _METRICS.values() for i in m.inputs}
    unknown = sorted(set(inputs) - known_inputs)
    if unknown:
        raise CodexError(f"unknown metric input(s) {', '.join(unknown)}; metrics take: {', '.join(sorted(known_inputs))}")
    for key, given in inputs.items():
        if isinstance(given, (str, bytes)) or not hasattr(given, "__len__") or not hasattr(given, "__getitem__"):
            raise CodexError(f"input {key!r} must be a sequence with one entry per sample, got {type(given).__name__}")

    results: dict[str, float] = {}
    for metric in metrics:
        missing = [i for i in metric.required if i not in inputs]
        if missing:
            raise CodexError(f"metric {metric.name!r} needs input(s) {', '.join(missing)}; it takes: {', '.join(metric.inputs)}")
        args = {k: inputs[k] for k in metric.inputs if k in inputs}
        n = _common_length(metric.name, args)
        if metric.per_sample:
            rows = _per_sample_rows(metric, args, n)
            results[metric.name] = float(metric.reduce(rows))
            values, statistic = rows, metric.reduce
        else:
            results[metric.name] = float(metric.fn(**args))

            def recompute(idx: np.ndarray, metric: Metric = metric, args: dict = args) -> float:
                return float(metric.fn(**{k: [v[i] for i in idx] for k, v in args.items()}))

            values, statistic = np.arange(n), recompute
        if ci and metric.bootstrap:
            low, high = bootstrap_ci(values, statistic, ci=ci, n_resamples=n_resamples, seed=seed)
            results[f"{metric.name}_ci_low"], results[f"{metric.name}_ci_high"] = low, high
    return results


def bootstrap_ci(
    per_sample_values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    ci: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over the samples, seeded: the same inputs give the same interval.

    ``per_sample_values`` has one value, or one row of values, per sample; resamples are drawn along its first axis.
    """
    values = np.asarray(per_sample_values)
    if values.ndim == 0 or len(values) == 0:
        raise CodexError(f"bootstrap_ci needs a non-empty sequence of per-sample values, got shape {values.shape}")
    if not 0 < ci < 1:
        raise CodexError(f"ci must be a confidence level between 0 and 1 (e.g. 0.95), got {ci}")
    if n_resamples < 1:
        raise CodexError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    n = len(values)
    stats = np.array([statistic(values[rng.integers(0, n, n)]) for _ in range(n_resamples)], dtype=np.float64)
    low, high = np.quantile(stats, [(1 - ci) / 2, (1 + ci) / 2])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------------------------
# The metrics


@register_metric("exact_match", per_sample=True)
def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the prediction equals the reference once leading and trailing whitespace is stripped."""
    _check_texts(predictions, references)
    return [float(p.strip() == r.strip()) for p, r in zip(predictions, references)]


# Identifiers and numbers are runs of word characters; every other non-space character is a token of its own.
_CODE_TOKEN = re.compile(r"\w+|[^\w\s]")


def code_tokens(text: str) -> list[str]:
    """Split text the way token F1 and distinct-n see it: ``foo(x_1)+2`` -> ``foo ( x_1 ) + 2``; case kept."""
    return _CODE_TOKEN.findall(text)


@register_metric("token_f1", per_sample=True)
def token_f1(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """SQuAD-style F1 on the bags of ``code_tokens`` of prediction and reference (1.0 when both are empty)."""
    _check_texts(predictions, references)
    scores = []
    for p, r in zip(predictions, references):
        pred, ref = code_tokens(p), code_tokens(r)
        if not pred or not ref:
            scores.append(float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / len(pred), common / len(ref)
        scores.append(2 * precision * recall / (precision + recall))
    return scores


# BLEU and chrF are sums of per-sample n-gram statistics scored at the end, which is how sacrebleu computes
# corpus_bleu / corpus_chrf and its own bootstrap; keeping the rows makes resampling cost a sum, not a re-tokenization.
# The two underscored methods are sacrebleu's (pinned); the tests hold the result equal to corpus_bleu / corpus_chrf.
@functools.cache
def _sacrebleu_metric(kind: str) -> BLEU | CHRF:
    # sacrebleu's defaults; force=True only silences its "looks tokenized" warning, since metrics never log
    return BLEU(force=True) if kind == "bleu" else CHRF()


def _sacrebleu_statistics(kind: str, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    _check_texts(predictions, references)
    rows = _sacrebleu_metric(kind)._extract_corpus_statistics(list(predictions), [list(references)])
    return np.asarray(rows, dtype=np.float64)


def _bleu_score(rows: np.ndarray) -> float:
    return float(_sacrebleu_metric("bleu")._compute_score_from_stats(rows.sum(axis=0).tolist()).score)


def _chrf_score(rows: np.ndarray) -> float:
    return float(_sacrebleu_metric("chrf")._compute_score_from_stats(rows.sum(axis=0).tolist()).score)


@register_metric("bleu", per_sample=True, reduce=_bleu_score)
def bleu_statistics(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """BLEU: equal to ``sacrebleu.corpus_bleu`` with its defaults (13a tokenization, exp smoothing), 0-100 scale.

    Returns sacrebleu's per-sample statistics (lengths, n-gram matches and totals); ``_bleu_score`` scores their sum.
    """
    return _sacrebleu_statistics("bleu", predictions, references)


@register_metric("chrf", per_sample=True, reduce=_chrf_score)
def chrf_statistics(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """chrF: equal to ``sacrebleu.corpus_chrf`` with its defaults (character 6-grams, beta 2), 0-100 scale."""
    return _sacrebleu_statistics("chrf", predictions, references)


@functools.cache
def _rouge_l_scorer() -> RougeScorer:
    # imported here because rouge-score pulls in nltk, which costs over a second at import
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


@register_metric("rouge_l", per_sample=True)
def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of rouge-score's ``RougeScorer(["rougeL"])`` for each sample.

    Its tokenizer lowercases and keeps only ASCII letters and digits: code punctuation does not count.
    """
    _check_texts(predictions, references)
    scorer = _rouge_l_scorer()
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def distinct_n(predictions: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of ``code_tokens`` in all predictions (n-grams don't cross samples); 0 if none."""
    if n < 1:
        raise CodexError(f"distinct-n needs n >= 1, got {n}")
    _check_texts(predictions)
    ngrams = [tuple(toks[i : i + n]) for p in predictions for toks in [code_tokens(p)] for i in range(len(toks) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def _register_distinct(n: int) -> None:
    @register_metric(f"distinct_{n}", bootstrap=False)
    def distinct(predictions: Sequence[str]) -> float:
        return distinct_n(predictions, n)

    distinct.__doc__ = f"distinct-{n}: unique {n}-grams over all {n}-grams in the predictions."


for _n in (1, 2, 3, 4):
    _register_distinct(_n)


@register_metric("perplexity")
def perplexity(losses: Sequence[float], token_counts: Sequence[int] | None = None) -> float:
    """exp of the token-weighted mean loss: ``losses[i]`` is sample i's mean loss per token (nats) over
    ``token_counts[i]`` tokens; without ``token_counts`` each loss is one token's. ``nan`` when there are no tokens.
    """
    loss = np.asarray(losses, dtype=np.float64)
    counts = np.ones_like(loss) if token_counts is None else np.asarray(token_counts, dtype=np.float64)
    if loss.ndim != 1 or counts.shape != loss.shape:
        raise CodexError(
            f"perplexity needs one loss and one token count per sample, got {loss.shape} losses and {counts.shape} token counts"
        )
    if (counts < 0).any():
        raise CodexError("perplexity: token counts must be >= 0")
    tokens = counts.sum()
    if tokens == 0:
        return float("nan")
    mean_loss = float((loss * counts).sum() / tokens)
    return math.exp(min(mean_loss, 700.0))  # capped like eval.loss, so huge losses stay finite


@register_metric("accuracy", per_sample=True)
def accuracy(predictions: Sequence[Any], references: Sequence[Any] | None = None) -> list[float]:
    """1.0 where ``predictions[i] == references[i]``; without references, the predictions are booleans (e.g. passed)."""
    if references is None:
        bad = [p for p in predictions if not isinstance(p, (bool, np.bool_))]
        if bad:
            raise CodexError(f"accuracy without references needs booleans as predictions, got {bad[0]!r}")
        return [float(p) for p in predictions]
    _check_lengths(predictions, references)
    return [float(p == r) for p, r in zip(predictions, references)]


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise CodexError(f"predictions and references differ in length: {len(predictions)} vs {len(references)}")


def _check_texts(predictions: Sequence, references: Sequence | None = None) -> None:
    for key, values in (("predictions", predictions), ("references", references)):
        if values is None:
            continue
        bad = next((v for v in values if not isinstance(v, str)), None)
        if bad is not None:
            raise CodexError(f"{key} must be strings, one per sample, got {type(bad).__name__}: {bad!r}")
    if references is not None:
        _check_lengths(predictions, references)


def _common_length(name: str, args: dict[str, Sequence]) -> int:
    lengths = {k: len(v) for k, v in args.items()}
    if not lengths:
        raise CodexError(f"metric {name!r}: no inputs given; it takes: {', '.join(get_metric(name).inputs)}")
    if len(set(lengths.values())) > 1:
        raise CodexError(f"metric {name!r}: inputs differ in length: " + ", ".join(f"{k}={n}" for k, n in lengths.items()))
    n = next(iter(lengths.values()))
    if n == 0:
        raise CodexError(f"metric {name!r}: no samples (inputs are empty)")
    return n


def _per_sample_rows(metric: Metric, args: dict[str, Sequence], n: int) -> np.ndarray:
    rows = np.asarray(metric.fn(**args), dtype=np.float64)
    if rows.ndim == 0 or len(rows) != n:
        raise CodexError(
            f"per-sample metric {metric.name!r} returned {rows.shape} for {n} samples: one value (or row) per sample expected"
        )
    return rows
