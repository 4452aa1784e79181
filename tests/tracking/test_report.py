"""report.html and compare.html in real headless Chromium: every plot rendered, nothing requested from the network."""

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Error, Route, sync_playwright

from codex_ml.errors import CodexError
from codex_ml.tracking.report import compare_runs, write_report
from helpers import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LOCAL = ("file:", "data:")  # all a self-contained page may load; anything else is the network


@dataclass
class Rendered:
    dom: str  # the DOM after rendering, serialised
    requests: list[str]  # every URL the page (its frames, scripts, styles) asked for, besides the page itself
    remote: list[str]  # those of them, and WebSockets, that would have left the machine: recorded, then refused
    drawn_plots: int  # <figure class="plot"> elements whose chart Chromium laid out with a visible line


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """The system's Chromium (Debian's, whatever version it serves), driven by Playwright; never a downloaded one.

    Only the basic protocol is used (launch, new page, go to a file URI, request events, evaluate), which
    Playwright drives across Chromium releases; if it cannot, the tests fail and say which versions met.
    """
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is needed to render the reports: apt-get install chromium (scripts/setup.sh --dev)")
    with sync_playwright() as playwright:
        try:
            # The page's requests are told from Chromium's own by the request events, not by this dead proxy: it
            # only keeps the browser's housekeeping (component updates, network time) off the network.
            launched = playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"],
            )
        except Error as e:
            pytest.fail(f"Playwright {version('playwright')} cannot drive {CHROMIUM} ({_chromium_version()}): {e}")
        yield launched
        launched.close()


def _chromium_version() -> str:
    out = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or out.stderr.strip()[-200:]


def render(browser: Browser, page: Path) -> Rendered:
    """Open ``page`` in a fresh browser context, record every request it makes, and refuse the remote ones.

    The request events come from the page's own frames, so Chromium's background traffic never appears in them.
    """
    context = browser.new_context()
    requests: list[str] = []
    remote: list[str] = []

    def route(r: Route) -> None:
        if r.request.url.startswith(LOCAL):
            r.continue_()
        else:
            remote.append(r.request.url)
            r.abort()

    try:
        context.on("request", lambda request: requests.append(request.url))
        context.route("**/*", route)
        tab = context.new_page()
        tab.on("websocket", lambda ws: remote.append(ws.url))  # WebSockets bypass routing: recorded here
        tab.goto(page.as_uri(), wait_until="load", timeout=60_000)
        tab.wait_for_load_state("networkidle", timeout=60_000)  # a script's late fetch is in the record too
        dom = tab.content()
        drawn = tab.evaluate("""() => [...document.querySelectorAll('figure.plot')].filter(figure => {
            const chart = figure.querySelector('svg'), line = figure.querySelector('svg path.series');
            const box = chart && chart.getBoundingClientRect();
            return box && box.width > 0 && box.height > 0 && line && line.getTotalLength() > 0;
        }).length""")
    except Error as e:
        pytest.fail(f"Playwright {version('playwright')} could not render {page} in {CHROMIUM} ({browser.version}): {e}")
    finally:
        context.close()
    return Rendered(dom, [u for u in requests if u != page.as_uri()], remote, drawn)


def rendered_plots(dom: str) -> int:
    """<svg> elements in the DOM, not counting any text inside scripts."""
    return len(re.findall(r"(?i)<svg\b", re.sub(r"(?is)<script\b.*?</script>", "", dom)))


def plots_in_source(page: Path) -> int:
    return page.read_text().count('<figure class="plot">')


def test_the_network_check_catches_a_page_that_loads_from_the_network(browser, tmp_path):
    page = tmp_path / "remote.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.example.invalid/style.css">'
        '<script src="http://js.example.invalid/app.js"></script></head><body><img src="http://example.invalid/logo.png">'
        '<iframe srcdoc="<img src=https://frame.example.invalid/pixel.gif>"></iframe>'
        '<script>fetch("https://api.example.invalid/beacon"); new WebSocket("wss://ws.example.invalid/live");</script>'
        "</body></html>"
    )
    r = render(browser, page)
    fetched = [
        "http://example.invalid/logo.png",
        "http://js.example.invalid/app.js",
        "https://api.example.invalid/beacon",
        "https://cdn.example.invalid/style.css",
        "https://frame.example.invalid/pixel.gif",
    ]
    assert sorted(r.requests) == fetched
    assert sorted(r.remote) == sorted([*fetched, "wss://ws.example.invalid/live"])
    assert "<iframe" in r.dom and r.drawn_plots == 0


def test_report_written_by_training_renders_offline(browser, tracked_run):
    page = tracked_run.path / "report.html"
    html = page.read_text()
    for title in ("Loss", "Learning rate", "Throughput", "Gradient norm", "System: utilisation", "System: memory"):
        assert f"<title>{title}</title>" in html, title
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<summary>packages (" in html and "<summary>config.yaml</summary>" in html
    r = render(browser, page)
    assert r.requests == [] and r.remote == []
    assert rendered_plots(r.dom) == r.drawn_plots == plots_in_source(page) >= 6


def test_report_command_with_evaluation_results(browser, tracked_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "env.json", "metrics.ndjson"):
        shutil.copy(tracked_run.path / name, run / name)
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(
        json.dumps(
            {
                "checkpoint": "step_00000012",
                "loss": {"loss": 5.61, "perplexity": 273.1, "accuracy": 0.031},
                "humaneval": {"pass@1": 0.125, "pass@10": 0.5, "n": 10, "problems": 164, "ci": {"pass@1": [0.1, 0.15]}},
            }
        )
    )
    out = run_cli("report", f"run_dir={run}")
    assert out.stdout.strip() == f"report: {run / 'report.html'}"
    html = (run / "report.html").read_text()
    assert "<h2>Evaluation</h2>" in html and "<h3>humaneval</h3>" in html and "<td>pass@10</td><td>0.5000</td>" in html
    assert "<td>ci.pass@1</td><td>0.1000, 0.1500</td>" in html and "step_00000012" in html
    assert not list(run.glob(".report.html*"))  # no temporary file left behind
    r = render(browser, run / "report.html")
    assert r.requests == [] and r.remote == []
    assert rendered_plots(r.dom) == r.drawn_plots == plots_in_source(run / "report.html") >= 1


def test_compare_prints_differences_and_overlays_curves(browser, tracked_run, repro_runs, tmp_path):
    out_page = tmp_path / "pages" / "compare.html"
    out = run_cli("compare", f"run_dirs=[{tracked_run.path},{repro_runs[0]}]", f"out={out_page}")
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["final", "metrics", "tracked", "r1"]
    row = {line.split()[0]: line.split()[1:] for line in lines if line and not line.startswith(("final", "config"))}
    assert row["training.lr"] == ["0.003", "0.005"]
    assert row["training.seed"] == ["1337", "5"] and row["training.deterministic"] == ["False", "True"]
    assert "run.dir" not in row and "model.n_layer" not in row  # where a run lives, and what is the same, are left out
    assert row["step"] == ["12", "12"] and len(row["val_loss"]) == 2
    assert lines[-1] == f"compare: {out_page}"
    html = out_page.read_text()
    for title in ("Training loss", "Validation loss", "Learning rate", "Throughput (tokens/s)"):
        assert f"<title>{title}</title>" in html
    r = render(browser, out_page)
    assert r.requests == [] and r.remote == []
    assert rendered_plots(r.dom) == r.drawn_plots == plots_in_source(out_page) >= 5


def test_a_folder_that_is_not_a_run_is_refused_and_nothing_written(tracked_run, tmp_path):
    empty = tmp_path / "notarun"
    empty.mkdir()
    out = run_cli("report", f"run_dir={empty}", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"error: {empty} is not a run folder: it has no config.yaml and no metrics.ndjson (codex-ml train writes them)"
    )
    assert list(empty.iterdir()) == []

    starting = tmp_path / "starting"  # a run that has not logged a step yet
    starting.mkdir()
    shutil.copy(tracked_run.path / "config.yaml", starting / "config.yaml")
    (starting / "metrics.ndjson").write_text(json.dumps({"event": "start", "step": 0, "time": 1.0}) + "\n")
    with pytest.raises(CodexError, match="has no metrics yet"):
        write_report(starting)
    assert not (starting / "report.html").exists()

    page = tmp_path / "compare.html"
    with pytest.raises(CodexError, match="not a run folder: no such folder"):
        compare_runs([tracked_run.path, tmp_path / "missing"], page)
    with pytest.raises(CodexError, match="has no metrics yet"):
        compare_runs([tracked_run.path, starting], page)
    assert not page.exists()
