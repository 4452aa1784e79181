"""SFT rows: the cache follows the chat template, and the dataset hash follows the data, not its counts."""

import json
import shutil

import numpy as np
import pytest

from codex_ml.conf.schema import DataConfig
from codex_ml.recipes.prepare import prepare_sft
from codex_ml.tokenizer.core import CodeTokenizer, SpecialTokens
from codex_ml.tokenizer.train import train_tokenizer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the same conversation rendered differently: a role line "### role:" instead of ChatML's markers
HEADED = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"print {i}"}, {"role": "assistant", "content": f"print({i})"}]} for i in range(12)
]


@pytest.fixture(scope="module")
def trained_tokenizer(corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:10]]
    return train_tokenizer("bpe", texts, 500, SpecialTokens(extra=["<|im_start|>", "<|im_end|>"]))


def tokenizer_dir(trained_tokenizer, path, template=CHATML):
    trained_tokenizer.save(
        path, ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<|im_start|>", "<|im_end|>"], chat_template=template
    )
    return path


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(records_file, tok_dir, cache):
    data = DataConfig(source="sft", paths=[str(records_file)], cache_dir=str(cache), val_fraction=0.2)
    return prepare_sft(data, CodeTokenizer.load(tok_dir), tok_dir, 32, log=lambda m: None)


def same_rows(a, b) -> bool:
    return all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("input_ids", "labels", "position_ids", "segments"))


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_changed_chat_template_gives_new_rows(trained_tokenizer, tmp_path, where):
    tok = tokenizer_dir(trained_tokenizer, tmp_path / "tok", template=None if where.endswith(".jinja") else CHATML)
    if where.endswith(".jinja"):  # the file transformers writes for templates since 4.47
        (tok / "chat_template.jinja").write_text(CHATML)
    records = write_records(tmp_path / "chat.jsonl", CONVERSATIONS)
    before = prepare(records, tok, tmp_path / "cache")
    if where.endswith(".jinja"):
        (tok / "chat_template.jinja").write_text(HEADED)
    else:
        config = json.loads((tok / "tokenizer_config.json").read_text())
        config["chat_template"] = HEADED
        (tok / "tokenizer_config.json").write_text(json.dumps(config))
    after = prepare(records, tok, tmp_path / "cache")
    assert after.directory != before.directory
    assert not same_rows(after.train, before.train)
    fresh = prepare(records, tok, tmp_path / "fresh-cache")  # what the new template gives with no cache at all
    assert same_rows(after.train, fresh.train) and same_rows(after.val, fresh.val)
    assert prepare(records, tok, tmp_path / "cache").directory == after.directory  # still cached when unchanged


def test_the_dataset_hash_covers_the_data_not_its_counts(trained_tokenizer, tmp_path):
    tok = tokenizer_dir(trained_tokenizer, tmp_path / "tok")
    plus = [{"prompt": f"def f{i}(a, b):\n", "completion": "    return a + b\n"} for i in range(10)]
    minus = [{"prompt": f"def f{i}(a, b):\n", "completion": "    return a - b\n"} for i in range(10)]
    # one file name in two folders: records without an id split by file name and line, so both split alike
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    a = prepare(write_records(tmp_path / "a" / "records.jsonl", plus), tok, tmp_path / "cache")
    b = prepare(write_records(tmp_path / "b" / "records.jsonl", minus), tok, tmp_path / "cache")
    counts = lambda m: {s: {k: v for k, v in m["splits"][s].items() if k != "sha256"} for s in m["splits"]}
    assert counts(a.manifest) == counts(b.manifest)  # same examples, rows and target tokens: only the data differs
    assert not same_rows(a.train, b.train)
    assert a.manifest["sha256"] != b.manifest["sha256"]
    assert a.manifest["splits"]["train"]["sha256"] != b.manifest["splits"]["train"]["sha256"]
    # the hash is of the rows: the same records elsewhere, prepared from scratch, hash the same
    shutil.copy(tmp_path / "a" / "records.jsonl", tmp_path / "c" / "records.jsonl")
    again = prepare(tmp_path / "c" / "records.jsonl", tok, tmp_path / "other-cache")
    assert again.directory != a.directory and again.manifest["sha256"] == a.manifest["sha256"]
