"""The split depends on each document's id alone."""

from codex_ml.data.clean import Document
from codex_ml.data.split import split_documents


def docs(n, prefix="f"):
    return [Document(f"{prefix}{i}.py", "x") for i in range(n)]


def test_split_fraction_and_stability_under_additions():
    train, val = split_documents(docs(2000), 0.1)
    assert 150 < len(val) < 250
    train2, val2 = split_documents(docs(2000) + docs(500, "new"), 0.1)
    assert {d.id for d in val} == {d.id for d in val2 if not d.id.startswith("new")}
    assert {d.id for d in train} == {d.id for d in train2 if not d.id.startswith("new")}


def test_order_does_not_matter():
    a = split_documents(docs(300), 0.2)[1]
    b = split_documents(list(reversed(docs(300))), 0.2)[1]
    assert {d.id for d in a} == {d.id for d in b}


def test_tiny_corpus_still_gets_a_validation_document():
    train, val = split_documents(docs(3), 0.01)
    assert len(val) == 1 and len(train) == 2
