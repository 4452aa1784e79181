"""Inline SVG charts: round ticks, gaps for values that are not finite, long series thinned, text escaped."""

import math
import re

import pytest

from codex_ml.tracking.plots import Series, downsample, format_number, line_chart, nice_ticks


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(5.6, 6.2)[0] == pytest.approx([5.6, 5.8, 6.0, 6.2])
    ticks, (lo, hi) = nice_ticks(1200, 45000)
    assert ticks == [0, 10000, 20000, 30000, 40000, 50000] and (lo, hi) == (0, 50000)
    assert nice_ticks(3, 3)[1][0] < 3 < nice_ticks(3, 3)[1][1]  # one value: a band around it
    assert nice_ticks(12, 12.5, min_step=1.0)[0] == [12, 13]  # steps are whole numbers
    assert [format_number(t, 10000) for t in ticks] == ["0", "10k", "20k", "30k", "40k", "50k"]
    assert format_number(0.00061) == "6.1e-4" and format_number(5.73623) == "5.736"


def test_chart_draws_a_line_per_series_with_gaps():
    svg = line_chart(
        "Loss <train>",
        [Series("train_loss", [(1, 3.0), (2, math.nan), (3, 2.5), (4, 2.0)]), Series("val_loss", [(4, 2.2)])],
        y_label="loss",
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "<title>Loss &lt;train&gt;</title>" in svg
    paths = re.findall(r'<path class="series" d="([^"]*)"', svg)
    assert len(paths) == 2
    assert paths[0].count("M") == 2 and paths[0].count("L") == 1  # the NaN at step 2 breaks the line
    assert svg.count("<circle") == 4  # short series get a dot at each finite point


def test_long_series_are_thinned_keeping_extremes_and_the_last_point():
    points = [(i, math.sin(i / 50) + (5 if i == 7777 else 0)) for i in range(20000)]
    thin = downsample(points)
    assert len(thin) <= 2001 and thin[-1] == points[-1] and (7777, points[7777][1]) in thin


def test_a_chart_without_data_is_an_error():
    with pytest.raises(ValueError, match="no finite points"):
        line_chart("empty", [Series("x", [(1, math.nan)])])
