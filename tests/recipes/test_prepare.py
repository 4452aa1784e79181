"""Data preparation: cache reuse and invalidation, workers, manifest, errors with per-reason counts."""

import json
import shutil

import numpy as np

from codex_ml.conf.schema import DataConfig, TokenizerConfig
from codex_ml.data.pack import open_split
from codex_ml.recipes.prepare import prepare_data
from helpers import run_cli


def config(corpus, **kw):
    return DataConfig(source="files", paths=[str(corpus)], num_workers=0, **kw), TokenizerConfig(vocab_size=400)


def quiet(message):
    pass


def test_cache_is_reused_and_rebuilt_when_inputs_change(corpus_dir, tmp_path):
    corpus = tmp_path / "c"
    shutil.copytree(corpus_dir, corpus)
    data, tok = config(corpus)
    first = prepare_data(data, tok, log=quiet)
    again = prepare_data(data, tok, log=quiet)
    assert again.directory == first.directory
    (corpus / "new_module.py").write_text("def new_function(x):\n    return x * 2\n" * 5)
    changed_source = prepare_data(data, tok, log=quiet)
    assert changed_source.directory != first.directory
    data2, _ = config(corpus, max_line_length=50)
    assert prepare_data(data2, tok, log=quiet).directory != changed_source.directory
    tok2 = TokenizerConfig(vocab_size=450)
    assert prepare_data(data, tok2, log=quiet).directory != changed_source.directory


def test_manifest_shards_and_workers(corpus_dir, tmp_path):
    data, tok = config(corpus_dir)
    p0 = prepare_data(data, tok, log=quiet)
    m = p0.manifest
    assert m["dtype"] == "uint16" and len(m["sha256"]) == 64
    train = np.concatenate(open_split(p0.directory, "train"))
    assert len(train) == m["splits"]["train"]["tokens"]
    assert (train == p0.tokenizer.eos_id).sum() == m["splits"]["train"]["documents"]
    data.num_workers, data.cache_dir = 2, str(tmp_path / "other-cache")
    p2 = prepare_data(data, tok, log=quiet)
    assert np.array_equal(np.concatenate(open_split(p2.directory, "train")), train)


def test_prepare_cli_summary_and_errors(corpus_dir, tmp_path):
    out = run_cli(
        "prepare",
        "data.source=files",
        f"data.paths=[{corpus_dir}]",
        "tokenizer.vocab_size=400",
        "data.num_workers=0",
        f"run.dir={tmp_path / 'run'}",
    )
    assert "skipped 0: binary 0" in out.stdout and (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()
    missing = run_cli("prepare", "data.source=files", "data.paths=[/no/such/dir]", f"run.dir={tmp_path / 'r2'}", check=False)
    assert missing.returncode == 2 and "/no/such/dir" in missing.stderr and "Traceback" not in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):
        (empty / f"b{i}.py").write_bytes(bytes(range(256)) * 10)
    out = run_cli("prepare", "data.source=files", f"data.paths=[{empty}]", f"run.dir={tmp_path / 'r3'}", check=False)
    assert out.returncode == 2 and "binary 3" in out.stderr


def test_jsonl_source_and_bad_records(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(
        "\n".join(json.dumps({"content": f"def f{i}(x):\n    return x + {i}\n" * 3, "path": f"m{i}.py"}) for i in range(30))
        + "\n"
    )
    data = DataConfig(source="jsonl", paths=[str(f)], text_field="content", id_field="path", num_workers=0)
    prepared = prepare_data(data, TokenizerConfig(vocab_size=300), log=quiet)
    assert prepared.manifest["splits"]["train"]["documents"] + prepared.manifest["splits"]["val"]["documents"] == 30
    f.write_text(json.dumps({"content": "x = 1\n" * 10}) + "\n" + json.dumps({"other": 1}) + "\n")
    out = run_cli(
        "prepare", "data.source=jsonl", f"data.paths=[{f}]", "data.text_field=content", f"run.dir={tmp_path / 'r'}", check=False
    )
    assert out.returncode == 2 and "docs.jsonl:2" in out.stderr and "content" in out.stderr


def test_hf_disk_source(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": [f"def g{i}():\n    return {i}\n" * 4 for i in range(40)]})
    ds.save_to_disk(str(tmp_path / "ds"))
    data = DataConfig(source="hf_disk", paths=[str(tmp_path / "ds")], num_workers=0)
    prepared = prepare_data(data, TokenizerConfig(vocab_size=300), log=quiet)
    assert sum(s["documents"] for s in prepared.manifest["splits"].values()) == 40
