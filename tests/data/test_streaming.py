"""What keeps prepare's memory independent of the corpus: bounded worker queues, progress bars that obey."""

from codex_ml.data.progress import progress_bar
from codex_ml.data.workers import ordered_map


def _init() -> None:
    pass


def _double(batch: list[int]) -> list[int]:
    return [2 * x for x in batch]


def test_ordered_map_keeps_a_bounded_number_of_batches_in_flight():
    read = []

    def batches():
        for i in range(40):
            read.append(i)
            yield [i]

    ahead = []
    out = []
    for result in ordered_map(_double, batches(), 2, _init, in_flight=2):
        ahead.append(len(read) - len(out))
        out.append(result)
    assert out == [[2 * i] for i in range(40)]  # in order
    assert max(ahead) <= 2 * 2  # Pool.imap would have read all 40 before the first result
    assert list(ordered_map(_double, iter([[1], [2]]), 0, _init)) == [[2], [4]]  # in this process


def test_progress_bars_follow_the_switch_and_the_rank(monkeypatch):
    monkeypatch.setenv("CODEX_ML_PROGRESS", "1")
    assert not progress_bar("x", 10).disable
    monkeypatch.setenv("RANK", "1")
    assert progress_bar("x", 10).disable  # only rank 0 draws
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CODEX_ML_PROGRESS", "0")
    assert progress_bar("x", 10).disable
