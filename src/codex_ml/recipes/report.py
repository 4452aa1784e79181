"""Recipes: `codex-ml report` (RUN/report.html) and `codex-ml compare` (a table and overlaid curves)."""

from __future__ import annotations

from pathlib import Path

from codex_ml.conf.schema import CompareConfig, ReportConfig
from codex_ml.tracking.report import compare_runs, write_report


def report_command(cfg: ReportConfig) -> Path:
    assert cfg.run_dir is not None  # validate_report requires it
    path = write_report(Path(cfg.run_dir))
    print(f"report: {path}")
    return path


def compare_command(cfg: CompareConfig) -> Path:
    table, path = compare_runs([Path(d) for d in cfg.run_dirs], Path(cfg.out))
    print(table)
    print(f"\ncompare: {path}")
    return path
