"""data.engine=datatrove: the same stages as datatrove tasks over shards, merged into one folder byte-identical
to the single-process run; near-dedup across shards as in one process; the Slurm chain built (not run here)."""

import json

import pytest

from codex_ml.conf.schema import ConfigError, DataConfig, TokenizerConfig, validate_data
from codex_ml.data.pack import MANIFEST
from codex_ml.recipes.prepare import prepare_data
from helpers import stdlib_sample

SECRET = "AKIA" + "Z7QW3ERT5YUI8OPA"  # pragma: allowlist secret (a fake AWS key id the redaction stage must catch)
RUN_DEPENDENT = ("created", "safety")  # a timestamp, and the safety stage's wall time inside "safety"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine-corpus")
    files = stdlib_sample(14)
    for i, p in enumerate(files):
        (d / f"m{i:02d}_{p.name}").write_text(p.read_text())
    # a near-copy and an exact copy that land in another shard than their original
    (d / "zz_near.py").write_text(files[0].read_text().replace("\n\n\n", "\n\n") + "\n# copied\n")
    (d / "zz_exact.py").write_text(files[1].read_text())
    (d / "m05_secret.py").write_text(f'aws_key = "{SECRET}"\n# reach ann@acme-corp.io\n' + files[2].read_text())
    return d


def _prepare(corpus, cache, **kw):
    data = DataConfig(source="files", paths=[str(corpus)], num_workers=0, decontaminate=[], cache_dir=str(cache), **kw)
    return prepare_data(data, TokenizerConfig(vocab_size=400), log=lambda m: None)


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != MANIFEST}


def _manifest(prepared):
    m = json.loads((prepared.directory / MANIFEST).read_text())
    m["safety"].pop("seconds")
    m.pop("created")
    return m


@pytest.mark.slow
def test_two_datatrove_workers_give_the_single_process_bytes(corpus, tmp_path):
    local = _prepare(corpus, tmp_path / "local")
    sharded = _prepare(corpus, tmp_path / "dt", engine="datatrove", engine_workers=2)
    assert _files(local.directory) == _files(sharded.directory)
    assert {n for n in _files(local.directory) if n.endswith(".bin")} == {"train_00000.bin", "val_00000.bin"}
    assert _manifest(local) == _manifest(sharded)
    m = _manifest(sharded)
    # the copies were found across shards: the exact one by cleaning, the near ones (zz_near.py, and m05_secret.py
    # of m02) by the global clustering
    assert m["cleaning"]["skipped"]["duplicate"] == 1 and m["safety"]["near_dedup"]["dropped"] == 2
    assert m["safety"]["redaction"]["findings"]["aws_access_key"] >= 1
    assert SECRET.encode() not in b"".join(_files(sharded.directory).values())
    # the tokenizer trained inside the chain is the one the single-process run trained
    assert local.tokenizer.sha256() == sharded.tokenizer.sha256()


@pytest.mark.slow
def test_the_result_does_not_depend_on_the_number_of_shards(corpus, tmp_path):
    two = _prepare(corpus, tmp_path / "two", engine="datatrove", engine_workers=2)
    three = _prepare(corpus, tmp_path / "three", engine="datatrove", engine_workers=3)
    assert _files(two.directory) == _files(three.directory) and _manifest(two) == _manifest(three)


def test_the_slurm_chain_is_built_with_its_dependencies(corpus, tmp_path):
    from datatrove.executor import SlurmPipelineExecutor

    from codex_ml.data.engine import build_executors
    from codex_ml.recipes.prepare import _Corpus

    data = DataConfig(source="files", paths=[str(corpus)], engine="datatrove_slurm", slurm_partition="cpu", engine_workers=8)
    merge = build_executors(tmp_path / "work", _Corpus(data, print).spec(None, TokenizerConfig()), data)
    chain = []
    while merge is not None:
        chain.append(merge)
        merge = merge.depends
    assert [type(e) for e in chain] == [SlurmPipelineExecutor] * 4
    assert [e.tasks for e in reversed(chain)] == [8, 1, 8, 1] and chain[0].partition == "cpu"


def test_bad_engine_settings_are_refused():
    for kw, message in (
        ({"engine": "spark"}, "data.engine: must be one of"),
        ({"engine_workers": 0}, "data.engine_workers: must be >= 1"),
        ({"engine": "datatrove_slurm"}, "needs data.slurm_partition"),
    ):
        with pytest.raises(ConfigError, match=message):
            validate_data(DataConfig(source="files", paths=["x"], **kw))
