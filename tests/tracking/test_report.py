"""report.html and compare.html in real headless Chromium: every plot rendered, nothing requested from the network."""

import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from codex_ml.errors import CodexError
from codex_ml.tracking.report import compare_runs, write_report
from helpers import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Proxy:
    """A TCP listener on loopback that records the first line of every connection and drops it: Chromium's proxy."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []  # "CONNECT host:443 HTTP/1.1" or "GET http://host/path HTTP/1.1"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.requests.append(conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace"))
                except OSError as e:
                    self.requests.append(f"unreadable: {e}")

    def hosts(self) -> list[str]:
        return [(urlsplit(r.split()[1]).hostname if r.startswith("GET ") else r.split()[1].rsplit(":", 1)[0])
                if len(r.split()) > 1 else r for r in self.requests]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Rendered:
    dom: str
    page_requests: list[str]  # URLs the page itself asked for
    unexplained: list[str]  # hosts the proxy saw that are not Chromium's own housekeeping


def render(page: Path) -> Rendered:
    """Render ``page`` in headless Chromium with every request sent to a proxy that answers none.

    Chromium itself talks to Google at start-up (network time, account list, search preconnects),
    so a connection alone proves nothing: Chromium's network log tells the page's requests (their
    initiator is the page's origin) from the browser's own (initiator "not an origin").
    """
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is needed to render the reports: apt-get install chromium (scripts/setup.sh --dev)")
    proxy = Proxy()
    scratch = Path(tempfile.mkdtemp(prefix="chromium-"))
    netlog = scratch / "netlog.json"
    try:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={scratch / 'profile'}",
             "--disable-features=NetworkTimeServiceQuerying",  # fewer of Chromium's own requests; the log tells the rest
             # every request, loopback included, goes to the recording proxy
             f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
             f"--log-net-log={netlog}", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "</html>" in out.stdout, out.stderr[-2000:]
        page_requests, browser_hosts = _requests_in_netlog(netlog)
    finally:
        proxy.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return Rendered(out.stdout, page_requests, [h for h in proxy.hosts() if h not in browser_hosts])


def _requests_in_netlog(path: Path) -> tuple[list[str], set[str]]:
    """(URLs requested by the page, hosts Chromium contacted on its own) from a --log-net-log file."""
    text = path.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut at exit lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    page, browser = [], set()
    for event in log["events"]:
        params, kind = event.get("params") or {}, names.get(event["type"])
        if kind == "URL_REQUEST_START_JOB" and params.get("url", "").startswith(("http:", "https:", "ws:", "wss:")):
            if params.get("initiator") == "not an origin":
                browser.add(urlsplit(params["url"]).hostname)
            else:
                page.append(params["url"])
        elif kind == "HTTP_STREAM_JOB_CONTROLLER" and params.get("is_preconnect"):
            browser.add(urlsplit(params["url"]).hostname)  # the browser warming up its search engine
    return page, browser


def rendered_plots(dom: str) -> int:
    """<svg> elements in the DOM, not counting any text inside scripts."""
    return len(re.findall(r"(?i)<svg\b", re.sub(r"(?is)<script\b.*?</script>", "", dom)))


def plots_in_source(page: Path) -> int:
    return page.read_text().count('<figure class="plot">')


def test_the_network_check_catches_a_page_that_loads_from_the_network(tmp_path):
    page = tmp_path / "remote.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.example.com/style.css"></head>'
                    '<body><img src="http://example.com/logo.png"></body></html>')
    r = render(page)
    assert sorted(r.page_requests) == ["http://example.com/logo.png", "https://cdn.example.com/style.css"]
    assert sorted(r.unexplained) == ["cdn.example.com", "example.com"]  # and they did reach the proxy


def test_report_written_by_training_renders_offline(tracked_run):
    page = tracked_run.path / "report.html"
    html = page.read_text()
    for title in ("Loss", "Learning rate", "Throughput", "Gradient norm", "System: utilisation", "System: memory"):
        assert f"<title>{title}</title>" in html, title
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<summary>packages (" in html and "<summary>config.yaml</summary>" in html
    r = render(page)
    assert r.page_requests == [] and r.unexplained == []
    assert rendered_plots(r.dom) == plots_in_source(page) >= 6


def test_report_command_with_evaluation_results(tracked_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "env.json", "metrics.ndjson"):
        shutil.copy(tracked_run.path / name, run / name)
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({
        "checkpoint": "step_00000012",
        "loss": {"loss": 5.61, "perplexity": 273.1, "accuracy": 0.031},
        "humaneval": {"pass@1": 0.125, "pass@10": 0.5, "n": 10, "problems": 164, "ci": {"pass@1": [0.1, 0.15]}},
    }))
    out = run_cli("report", f"run_dir={run}")
    assert out.stdout.strip() == f"report: {run / 'report.html'}"
    html = (run / "report.html").read_text()
    assert "<h2>Evaluation</h2>" in html and "<h3>humaneval</h3>" in html and "<td>pass@10</td><td>0.5000</td>" in html
    assert "<td>ci.pass@1</td><td>0.1000, 0.1500</td>" in html and "step_00000012" in html
    assert not list(run.glob(".report.html*"))  # no temporary file left behind
    r = render(run / "report.html")
    assert r.page_requests == [] and r.unexplained == []
    assert rendered_plots(r.dom) == plots_in_source(run / "report.html")


def test_compare_prints_differences_and_overlays_curves(tracked_run, repro_runs, tmp_path):
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
    r = render(out_page)
    assert r.page_requests == [] and r.unexplained == []
    assert rendered_plots(r.dom) == plots_in_source(out_page) >= 5


def test_a_folder_that_is_not_a_run_is_refused_and_nothing_written(tracked_run, tmp_path):
    empty = tmp_path / "notarun"
    empty.mkdir()
    out = run_cli("report", f"run_dir={empty}", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"error: {empty} is not a run folder: it has no config.yaml and no metrics.ndjson "
                                  "(codex-ml train writes them)")
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
