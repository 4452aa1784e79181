"""TensorBoard: the event files under RUN/tensorboard/ read back with TensorBoard's own EventAccumulator."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file (the resumed process wrote a second file), by tag, in step order."""
    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2, files  # one per process: trained to step 8, then resumed to 12
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((s.step, s.value) for s in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in out.items()}


def test_scalars_match_metrics_ndjson(tracked_run):
    tb = scalars(tracked_run.path)
    rows = [json.loads(line) for line in (tracked_run.path / "metrics.ndjson").read_text().splitlines()]
    for kind, keys in (("train", ("train_loss", "lr", "grad_norm", "tokens_per_s")), ("eval", ("val_loss", "val_ppl"))):
        events = [r for r in rows if r["event"] == kind]
        for key in keys:
            # TensorBoard stores float32
            assert tb[key] == [(e["step"], pytest.approx(e[key], rel=1e-6)) for e in events], key
    assert [s for s, _ in tb["val_loss"]] == [8, 12]
    assert {"system/cpu_percent", "system/process_rss_mb"} <= set(tb)
