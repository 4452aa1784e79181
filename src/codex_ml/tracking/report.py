"""Run reports and run comparisons: self-contained HTML pages (inline SVG, no script, no network).

``write_report(RUN)`` writes ``RUN/report.html``: loss, learning rate, throughput, gradient norm and
system metrics against steps, the tables of ``RUN/eval/results.json``, the config and the
environment. ``compare_runs([A, B, ...], out)`` returns a text table of the runs' final metrics and of
the config keys that differ, and writes a page with their curves overlaid. Both only read run
folders; a folder that is not a run, or a run with no metrics yet, is a ``CodexError`` and nothing is
written. Pages are written to a temporary file and renamed, so no reader ever sees half a page.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import yaml

from codex_ml.errors import CodexError
from codex_ml.runs import CONFIG_FILE, ENV_FILE, METRICS_FILE
from codex_ml.tracking.events import read_events
from codex_ml.tracking.mlflow_sink import flatten
from codex_ml.tracking.plots import CHART_CSS, PALETTE, Series, line_chart

REPORT_FILE = "report.html"
RESULTS_FILE = Path("eval") / "results.json"
# Events that mark what happened rather than measure it; their numbers (parameters, best) are not curves.
LIFECYCLE_EVENTS = {"start", "checkpoint", "end", "interrupted", "early_stop"}
NOT_CURVES = {"step", "time", "tokens", "val_tokens"}  # counters and time stamps
LOCATION_KEYS = {"run.dir", "run.name"}  # differ between any two runs; the tables name the runs already
TRAINING_CHARTS = (  # (title, keys, y label), in the order a reader looks for them
    ("Loss", ("train_loss", "val_loss"), "loss"),
    ("Learning rate", ("lr",), "lr"),
    ("Throughput", ("tokens_per_s",), "tokens/s"),
    ("Gradient norm", ("grad_norm",), "grad norm"),
    ("Model FLOPs utilisation", ("mfu",), "MFU"),
)
SYSTEM_GROUPS = (  # key suffix -> one chart per unit
    (("_percent", "_utilization"), "System: utilisation", "%"),
    (("_mb",), "System: memory", "MB"),
    (("_w",), "System: power", "W"),
)
COMPARE_CHARTS = {
    "train_loss": "Training loss",
    "val_loss": "Validation loss",
    "lr": "Learning rate",
    "tokens_per_s": "Throughput (tokens/s)",
    "grad_norm": "Gradient norm",
}


@dataclass
class RunData:
    """What a run folder holds, read once: config, environment, events and evaluation results."""

    path: Path
    config: dict
    config_text: str
    env: dict | None
    events: list[dict]
    results: object = None  # eval/results.json, any JSON
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def last(self, key: str) -> float | None:
        points = self.curves.get(key)
        return points[-1][1] if points else None


def load_run(run_dir: Path) -> RunData:
    """Read a run folder; a folder that is not a run or has no metrics yet is a ``CodexError`` naming what is missing."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise CodexError(f"{run_dir} is not a run folder: no such folder")
    missing = [name for name in (CONFIG_FILE, METRICS_FILE) if not (run_dir / name).is_file()]
    if missing:
        raise CodexError(f"{run_dir} is not a run folder: it has no {' and no '.join(missing)} (codex-ml train writes them)")
    events = read_events(run_dir / METRICS_FILE)
    if not any(e.get("event") in ("train", "eval") for e in events):
        raise CodexError(f"run {run_dir} has no metrics yet: {METRICS_FILE} holds no training or validation events")
    config_text = (run_dir / CONFIG_FILE).read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError as e:
        raise CodexError(f"{run_dir / CONFIG_FILE} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise CodexError(f"{run_dir / CONFIG_FILE} does not hold a config (a mapping of keys to values)")
    env = _read_json(run_dir / ENV_FILE) if (run_dir / ENV_FILE).is_file() else None
    results = _read_json(run_dir / RESULTS_FILE) if (run_dir / RESULTS_FILE).is_file() else None
    return RunData(run_dir, config, config_text, env, events, results, metric_curves(events))


def metric_curves(events: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Every numeric field of every measuring event, as (step, value) points in step order."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("event") in LIFECYCLE_EVENTS or not isinstance(e.get("step"), (int, float)):
            continue
        for key, value in e.items():
            if key in NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            curves.setdefault(key, []).append((e["step"], float(value)))
    for points in curves.values():
        points.sort(key=lambda p: p[0])  # stable: equal steps keep the order they were logged in
    return curves


# ---------------------------------------------------------------- the run report


def write_report(run_dir: Path) -> Path:
    """Write ``RUN/report.html`` (atomically) and return its path."""
    run = load_run(run_dir)
    out = run.path / REPORT_FILE
    _write_atomic(out, render_report(run))
    return out


def render_report(run: RunData) -> str:
    sections = [
        f"<h1>Run {escape(run.name)}</h1>",
        f'<p class="path">{escape(str(run.path))}</p>',
        _table(["", ""], _summary_rows(run), cls="summary"),
        "<h2>Training</h2>",
        _charts(_training_charts(run)),
    ]
    validation = _validation_charts(run)
    if validation:
        sections += ["<h2>Validation</h2>", _charts(validation)]
    sections.append("<h2>System</h2>")
    system = _system_charts(run)
    every = run.config.get("tracking", {}).get("system_every_s")
    sections.append(
        _charts(system)
        if system
        else f'<p class="note">No system metrics yet: they are sampled every {escape(str(every))} s '
        "(tracking.system_every_s).</p>"
    )
    if run.results is not None:
        sections += [
            "<h2>Evaluation</h2>",
            f'<p class="path">{escape(str(run.path / RESULTS_FILE))}</p>',
            _results_html(run.results),
        ]
    sections += [
        "<h2>Config</h2>",
        f"<details open><summary>{CONFIG_FILE}</summary><pre>{escape(run.config_text)}</pre></details>",
        "<h2>Environment</h2>",
        _env_html(run.env),
    ]
    return _page(f"codex-ml run {run.name}", "\n".join(sections))


def _summary_rows(run: RunData) -> list[list[str]]:
    cfg, env = run.config, run.env or {}
    steps = [e["step"] for e in run.events if isinstance(e.get("step"), (int, float))]
    max_steps = cfg.get("training", {}).get("max_steps")
    kinds = [e.get("event") for e in run.events]
    lifecycle = [k for k in kinds if k in ("start", "end", "interrupted", "early_stop")]
    status = {
        "end": "finished",
        "interrupted": "interrupted (run the same command to resume)",
        "early_stop": "stopped early",
    }.get(lifecycle[-1] if lifecycle else "", "running, or stopped without an end event")
    if "early_stop" in kinds and lifecycle and lifecycle[-1] == "end":
        status = "finished (stopped early)"
    times = [e["time"] for e in run.events if isinstance(e.get("time"), (int, float))]
    tokens = [e["tokens"] for e in run.events if e.get("event") == "train" and isinstance(e.get("tokens"), (int, float))]
    start = next((e for e in run.events if e.get("event") == "start"), {})
    rows = [["status", status], ["steps", f"{max(steps, default=0)}" + (f" of {max_steps}" if max_steps else "")]]
    if tokens:
        rows.append(["tokens trained on", f"{int(tokens[-1]):,}"])
    if times:
        rows.append(["logged from / to", f"{_stamp(times[0])} / {_stamp(times[-1])}"])
    for key in ("train_loss", "val_loss", "val_ppl", "val_accuracy"):
        if (last := run.last(key)) is not None:
            rows.append([f"final {key}", metric_text(last)])
    best = _best(run)
    if best:
        rows.append([f"best {best[0]}", f"{metric_text(best[1])} at step {best[2]:g}"])
    rate = _median_rate(run)
    if rate:
        rows.append(["tokens/s (median)", metric_text(rate)])
    if isinstance(start.get("parameters"), int):
        rows.append(["parameters", f"{start['parameters']:,}"])
    for label, value in (
        ("model", env.get("model")),
        ("device", env.get("device") or start.get("device")),
        ("seed", env.get("seed")),
        ("deterministic", env.get("deterministic")),
        ("git commit", env.get("git_commit")),
        ("codex-ml", env.get("codex_ml_version")),
    ):
        if value is not None:
            rows.append([label, str(value)])
    return rows


def _training_charts(run: RunData) -> list[str]:
    charts: list[str] = []
    used: set[str] = set()
    for title, keys, y_label in TRAINING_CHARTS:
        present = [k for k in keys if k in run.curves]
        used.update(keys)
        if present:
            charts.append(line_chart(title, [Series(k, run.curves[k]) for k in present], y_label=y_label))
    others = [k for k in run.curves if k not in used and not k.startswith(("val_", "system/"))]
    charts += [line_chart(k, [Series(k, run.curves[k])], y_label=k) for k in sorted(others)]
    return charts


def _validation_charts(run: RunData) -> list[str]:
    keys = [k for k in run.curves if k.startswith("val_") and k != "val_loss"]
    return [line_chart(k, [Series(k, run.curves[k])], y_label=k) for k in sorted(keys)]


def _system_charts(run: RunData) -> list[str]:
    keys = sorted(k for k in run.curves if k.startswith("system/"))
    charts, used = [], set()
    for suffixes, title, unit in SYSTEM_GROUPS:
        group = [k for k in keys if k.endswith(suffixes)]
        used.update(group)
        if group:
            charts.append(line_chart(title, [Series(k.removeprefix("system/"), run.curves[k]) for k in group], y_label=unit))
    charts += [line_chart(k, [Series(k.removeprefix("system/"), run.curves[k])], y_label=k) for k in keys if k not in used]
    return charts


def _best(run: RunData) -> tuple[str, float, float] | None:
    training = run.config.get("training", {})
    metric, mode = training.get("best_metric", "val_loss"), training.get("best_mode", "min")
    points = [(s, v) for s, v in run.curves.get(metric, []) if math.isfinite(v)]
    if not points:
        return None
    step, value = (min if mode == "min" else max)(points, key=lambda p: p[1])
    return metric, value, step


def _median_rate(run: RunData) -> float | None:
    rates = [v for _, v in run.curves.get("tokens_per_s", []) if math.isfinite(v)]
    return statistics.median(rates) if rates else None


def _results_html(results: Any) -> str:
    """``eval/results.json`` read generically: top-level numbers in one table, each task's metrics in its own."""
    if not isinstance(results, dict):
        return f"<pre>{escape(json.dumps(results, indent=2)[:20000])}</pre>"
    scalars = [[k, _cell(v)] for k, v in results.items() if not isinstance(v, (dict, list))]
    out = [_table(["", ""], scalars, cls="summary")] if scalars else []
    for task, metrics in results.items():
        if isinstance(metrics, dict):
            flat = _flatten_values(metrics)
            out += [f"<h3>{escape(str(task))}</h3>", _table(["metric", "value"], [[k, _cell(v)] for k, v in flat.items()])]
        elif isinstance(metrics, list) and metrics and all(isinstance(r, dict) for r in metrics):
            columns = list(dict.fromkeys(k for r in metrics for k in r))
            rows = [[_cell(r.get(c, "")) for c in columns] for r in metrics[:200]]
            more = f'<p class="note">{len(metrics) - 200} more rows in results.json</p>' if len(metrics) > 200 else ""
            out += [f"<h3>{escape(str(task))}</h3>", _table(columns, rows), more]
        elif isinstance(metrics, list):
            out += [f"<h3>{escape(str(task))}</h3>", f"<p>{escape(_cell(metrics))}</p>"]
    return "\n".join(out)


def _flatten_values(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_values(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def metric_text(value: float) -> str:
    """A metric in a table: four decimals, thousands separated, scientific notation below 0.001."""
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:,.0f}" if abs(value) >= 1e3 else f"{value:.4f}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return metric_text(value)
    if isinstance(value, list):
        if len(value) <= 10 and all(not isinstance(v, (dict, list)) for v in value):
            return ", ".join(_cell(v) for v in value)
        return f"({len(value)} items)"
    return str(value)


def _env_html(env: dict | None) -> str:
    if env is None:
        return f'<p class="note">No {ENV_FILE} in this run folder.</p>'
    shown = {k: v for k, v in env.items() if k not in ("packages", "argv")}
    rows = [[k, _cell(v)] for k, v in _flatten_values(shown).items()]
    if isinstance(env.get("argv"), list):
        rows.append(["argv", " ".join(map(str, env["argv"]))])
    out = [_table(["", ""], rows, cls="summary")]
    packages = env.get("packages")
    if isinstance(packages, dict):
        out.append(
            f"<details><summary>packages ({len(packages)})</summary>"
            + _table(["package", "version"], [[k, str(v)] for k, v in packages.items()])
            + "</details>"
        )
    return "\n".join(out)


# ---------------------------------------------------------------- comparing runs


def compare_runs(run_dirs: list[Path], out: Path) -> tuple[str, Path]:
    """A text table of the runs' final metrics and differing config keys; their curves overlaid in ``out``."""
    if not run_dirs:
        raise CodexError("compare needs at least one run folder")
    runs = [load_run(Path(d)) for d in run_dirs]
    labels = _labels([r.path for r in runs])
    metric_rows = _final_metric_rows(runs)
    diff_rows = _config_diff_rows(runs)
    text = [_text_table(["final metrics", *labels], metric_rows)]
    if diff_rows:
        text.append(_text_table(["config keys that differ", *labels], diff_rows))
    else:
        text.append("config keys that differ: none (besides run.dir and run.name)")
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / "compare.html"
    out = out.resolve()
    _write_atomic(out, render_compare(runs, labels, metric_rows, diff_rows))
    return "\n\n".join(text), out


def render_compare(runs: list[RunData], labels: list[str], metric_rows: list[list[str]], diff_rows: list[list[str]]) -> str:
    keys = [k for k in COMPARE_CHARTS if any(k in r.curves for r in runs)]
    keys += sorted({k for r in runs for k in r.curves if k.startswith("val_") and k not in keys})
    charts = []
    for key in keys:
        series = [
            Series(label, r.curves[key], PALETTE[i % len(PALETTE)])
            for i, (label, r) in enumerate(zip(labels, runs))
            if r.curves.get(key)
        ]
        charts.append(line_chart(COMPARE_CHARTS.get(key, key), series, y_label=key))
    listing = _table(["run", "folder"], [[label, str(r.path)] for label, r in zip(labels, runs)])
    body = [
        f"<h1>Comparing {len(runs)} runs</h1>",
        listing,
        "<h2>Final metrics</h2>",
        _table(["", *labels], metric_rows),
        "<h2>Config keys that differ</h2>",
        _table(["key", *labels], diff_rows) if diff_rows else '<p class="note">None (besides run.dir and run.name).</p>',
        "<h2>Curves</h2>",
        _charts(charts),
    ]
    return _page("codex-ml: " + ", ".join(labels), "\n".join(body))


def _final_metric_rows(runs: list[RunData]) -> list[list[str]]:
    """Rows of (metric, value per run): last step, last training loss, last validation metrics, best, throughput."""
    per_run = []
    for r in runs:
        m: dict[str, str] = {}
        steps = [p[0] for points in r.curves.values() for p in points]
        m["step"] = f"{max(steps):g}"
        for key in ["train_loss", "val_loss", *sorted(k for k in r.curves if k.startswith("val_") and k != "val_loss")]:
            if (last := r.last(key)) is not None:
                m[key] = metric_text(last)
        best = _best(r)
        if best:
            m[f"best {best[0]}"] = metric_text(best[1])
        rate = _median_rate(r)
        if rate:
            m["tokens/s (median)"] = metric_text(rate)
        if isinstance(r.results, dict):
            for k, v in _flatten_values({t: v for t, v in r.results.items() if isinstance(v, dict)}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    m[f"eval {k}"] = metric_text(v) if isinstance(v, float) else str(v)
        per_run.append(m)
    keys = list(dict.fromkeys(k for m in per_run for k in m))
    return [[k, *(m.get(k, "-") for m in per_run)] for k in keys]


def _config_diff_rows(runs: list[RunData]) -> list[list[str]]:
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    rows = []
    for key in keys:
        values = [f.get(key, "-") for f in flat]
        if key not in LOCATION_KEYS and len(set(values)) > 1:
            rows.append([key, *values])
    return rows


def _labels(paths: list[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (``a``, or ``sweep-1/0`` and ``sweep-2/0``)."""
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in paths):
            break
        depth += 1
    seen: dict[str, int] = {}
    out = []
    for label in labels:  # the same folder given twice
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


# ---------------------------------------------------------------- HTML and files

PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1360px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; } .path { color: #666; font-family: monospace; margin-top: 0; } .note { color: #666; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } .charts figure { margin: 0; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } table.summary th { display: none; } table.summary td:first-child { color: #555; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
details summary { cursor: pointer; margin: 8px 0; }
"""


def _page(title: str, body: str) -> str:
    # The policy lets the page load nothing at all: no script, font, image or style from anywhere.
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{PAGE_CSS}{CHART_CSS}</style>
</head>
<body>
{body}
<p class="note">Written by codex-ml on {_stamp(time.time())}.</p>
</body>
</html>
"""


def _charts(charts: list[str]) -> str:
    return '<div class="charts">' + "".join(f'<figure class="plot">{c}</figure>' for c in charts) + "</div>"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CodexError(f"{path} is not valid JSON: {e}") from None


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``: all of the page or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
