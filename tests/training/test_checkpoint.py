"""Checkpoints: atomic, verified against their manifest, pruned by recency and by metric."""

import pytest

from codex_ml.training.checkpoint import (
    CheckpointError,
    best_checkpoint,
    complete_checkpoints,
    latest_complete_checkpoint,
    prune_checkpoints,
    remove_partial,
    save_checkpoint,
    verify_checkpoint,
)


def save(root, step, metric=None):
    files = {"model.safetensors": bytes(range(256)) * 4, "optimizer.pt": b"opt" * 100}
    return save_checkpoint(root, step, files, metrics={"val_loss": metric} if metric is not None else {})


def test_saved_checkpoint_is_complete_and_verifies(tmp_path):
    path = save(tmp_path, 10)
    assert path.name == "step_00000010"
    assert (path / "COMPLETE").exists()
    manifest = verify_checkpoint(path)
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt"}
    assert manifest["step"] == 10


def test_bit_flip_and_truncation_are_refused_naming_the_file(tmp_path):
    path = save(tmp_path, 1)
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x10
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*SHA-256"):
        verify_checkpoint(path)
    path = save(tmp_path, 2)
    o = path / "optimizer.pt"
    o.write_bytes(o.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="optimizer.pt.*truncated"):
        verify_checkpoint(path)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt: missing"):
        verify_checkpoint(path)


def test_half_written_checkpoints_are_invisible_and_cleaned(tmp_path):
    save(tmp_path, 5)
    (tmp_path / ".tmp-step_00000010-123").mkdir()
    (tmp_path / ".tmp-step_00000010-123" / "model.safetensors").write_bytes(b"partial")
    incomplete = tmp_path / "step_00000020"
    incomplete.mkdir()  # no COMPLETE marker
    assert latest_complete_checkpoint(tmp_path).step == 5
    removed = remove_partial(tmp_path)
    assert [p.name for p in removed] == [".tmp-step_00000010-123"]


def test_existing_step_is_kept(tmp_path):
    first = save(tmp_path, 3)
    before = (first / "manifest.json").read_text()
    save_checkpoint(tmp_path, 3, {"other.bin": b"x"})
    assert (first / "manifest.json").read_text() == before


def test_prune_keeps_last_and_best(tmp_path):
    for step, loss in [(1, 5.0), (2, 3.0), (3, 4.0), (4, 4.5), (5, 6.0)]:
        save(tmp_path, step, loss)
    removed = prune_checkpoints(tmp_path, keep_last=2, keep_best=1, metric="val_loss", mode="min")
    assert sorted(c.step for c in complete_checkpoints(tmp_path)) == [2, 4, 5]
    assert len(removed) == 2
    assert best_checkpoint(tmp_path, "val_loss", "min").step == 2
    prune_checkpoints(tmp_path, keep_last=1, keep_best=0, metric="val_loss", mode="min")
    assert [c.step for c in complete_checkpoints(tmp_path)] == [5]
