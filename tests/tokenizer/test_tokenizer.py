"""Both tokenizer backends: exact round trips, special tokens, and identical encoding through AutoTokenizer."""

import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from codex_ml.tokenizer.core import CodeTokenizer, SpecialTokens, TokenizerError
from codex_ml.tokenizer.train import train_tokenizer

TRICKY = [
    "\tx = 1\r\n    y = 'naïve 日本語 🐍'\n\n\n  ",
    "",
    " leading space",
    "trailing spaces  \n",
    "a\u2581b uses the SentencePiece meta symbol",
    "literal <0x41> and <unk> and \x00\x01 control bytes \U0010ffff",
    "a document that mentions <|endoftext|> and <fim_prefix> as text",
]


@pytest.fixture(scope="module")
def texts(corpus_dir):
    return [p.read_text() for p in sorted(corpus_dir.glob("*.py"))]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def trained(request, texts, tmp_path_factory):
    tok = train_tokenizer(request.param, texts, 600, SpecialTokens(extra=["<|im_start|>", "<|im_end|>"]))
    d = tmp_path_factory.mktemp(request.param)
    tok.save(
        d,
        ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<|im_start|>", "<|im_end|>"],
        model_max_length=128,
        padding_side="left",
        truncation_side="left",
    )
    return request.param, tok, d


def test_round_trip_is_exact(trained, texts):
    _, tok, _ = trained
    for text in texts + TRICKY:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_in_text_stay_text(trained):
    _, tok, _ = trained
    ids = tok.encode("x <|endoftext|> y")
    assert tok.eos_id not in ids


def test_vocab_size_and_special_ids(trained):
    kind, tok, _ = trained
    assert len(tok) == 600
    assert tok.eos_id != tok.pad_id
    assert all(tok.fim_ids[r] is not None for r in ("prefix", "middle", "suffix"))
    if kind == "bpe":
        assert (tok.eos_id, tok.pad_id) == (0, 1)


def test_auto_tokenizer_loads_and_encodes_identically(trained, texts):
    _, tok, d = trained
    hf = AutoTokenizer.from_pretrained(str(d))
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert len(hf) == len(tok)
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    assert hf.padding_side == "left" and hf.truncation_side == "left" and hf.model_max_length == 128
    assert {"<fim_prefix>", "<fim_middle>", "<fim_suffix>"} <= set(hf.all_special_tokens)
    for text in texts[:10] + TRICKY[:6]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert hf.decode(ids) == text
        assert ids == tok.encode(text)


def test_chat_template_renders(trained):
    _, _, d = trained
    hf = AutoTokenizer.from_pretrained(str(d))
    text = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_load_round_trip_keeps_hash(trained):
    _, tok, d = trained
    again = CodeTokenizer.load(d)
    assert again.sha256() == tok.sha256()
    assert again.encode("def f(x):\n    return x") == tok.encode("def f(x):\n    return x")


def test_training_is_deterministic(texts):
    a = train_tokenizer("bpe", texts, 500, SpecialTokens())
    b = train_tokenizer("bpe", texts, 500, SpecialTokens())
    assert a.sha256() == b.sha256()


def test_missing_directory_and_missing_eos(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        CodeTokenizer.load(tmp_path / "nope")
    tok = train_tokenizer("bpe", ["abc def " * 50], 300, SpecialTokens())
    tok.save(tmp_path, [])
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="eos_token"):
        CodeTokenizer.load(tmp_path)
