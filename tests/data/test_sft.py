"""SFT: records to examples, loss masks on completions and assistant turns, packing that equals no packing."""

import json

import pytest
import torch

from codex_ml.data.rows import pack_examples, row_batch
from codex_ml.data.sft import SftEncoder, SftRecordError, check_record, read_records
from codex_ml.models.gpt import GPT, GPTConfig, document_block_mask
from codex_ml.models.loss import summed_token_loss
from codex_ml.tokenizer.core import SpecialTokens
from codex_ml.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(corpus_dir, tmp_path_factory):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:10]]
    tok = train_tokenizer("bpe", texts, 500, SpecialTokens(extra=["<|im_start|>", "<|im_end|>"]))
    d = tmp_path_factory.mktemp("tok")
    tok.save(d, ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<|im_start|>", "<|im_end|>"])
    return d


def test_completion_record_trains_the_completion_and_eos(tok_dir):
    enc = SftEncoder(tok_dir)
    ex = enc.encode("f:1", {"prompt": "def f(x):\n", "completion": "    return x\n"})
    n_prompt = len(enc.plain.encode("def f(x):\n").ids)
    assert ex.trained == [False] * n_prompt + [True] * (len(ex.ids) - n_prompt)
    assert ex.ids[-1] == enc.eos_id


def test_chat_record_trains_assistant_turns_with_end_of_turn(tok_dir):
    enc = SftEncoder(tok_dir)
    messages = [
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": "print(1 + 2)"},
        {"role": "user", "content": "and 3?"},
        {"role": "assistant", "content": "print(3)"},
    ]
    ex = enc.encode("f:2", {"messages": messages})
    trained_text = enc.hf.decode([i for i, t in zip(ex.ids, ex.trained) if t])
    assert trained_text == "print(1 + 2)<|im_end|>\nprint(3)<|im_end|>\n"


@pytest.mark.parametrize(
    "record,needle",
    [
        ({"prompt": "x"}, "completion"),
        ({"text": "x"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant"),
        ({"messages": [{"role": "user"}]}, "content"),
    ],
)
def test_bad_records_name_the_problem(record, needle):
    with pytest.raises(SftRecordError, match=needle):
        check_record("data.jsonl:7", record)


def test_bad_json_names_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{broken\n")
    with pytest.raises(SftRecordError, match=r"d.jsonl:2"):
        list(read_records([str(f)]))


def test_failing_chat_template_names_the_record(tok_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tok_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('no system messages') }}"
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SftRecordError, match="data.jsonl:3.*chat template failed"):
        SftEncoder(bad).encode("data.jsonl:3", {"messages": [{"role": "assistant", "content": "x"}]})


@pytest.mark.parametrize("flex", [False, True])
def test_packed_loss_equals_unpacked_loss(tok_dir, flex):
    enc = SftEncoder(tok_dir)
    records = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x * {i}\n"} for i in range(7)]
    records.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "print('hi')"}]})
    examples = [enc.encode(f"r:{i}", r) for i, r in enumerate(records)]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, max_seq_len=128)).eval()
    packed = pack_examples(examples, 96, enc.hf.pad_token_id, pack=True)
    single = pack_examples(examples, 96, enc.hf.pad_token_id, pack=False)
    assert len(packed) < len(single) == len(examples)

    def total(rows):
        loss, n = 0.0, 0
        for i in range(len(rows)):
            b = row_batch(rows, torch.tensor([i]).numpy(), native=True, flex=flex)
            mask = document_block_mask(b["segments"]) if flex else b["attn_mask"]
            with torch.no_grad():
                logits = model(b["input_ids"], position_ids=b["position_ids"], attn_mask=mask)
            loss += summed_token_loss(logits, b["labels"]).item()
            n += int((b["labels"] != -100).sum())
        return loss, n

    (lp, np_), (lu, nu) = total(packed), total(single)  # flex packs, the reference is always one per row
    assert np_ == nu
    assert abs(lp / np_ - lu / nu) < 1e-5
