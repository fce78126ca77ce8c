"""End to end: `streamlit run dashboards/app.py` on the tiny outputs folder, looked at by headless
Chromium (driven over the DevTools protocol): screenshots are not blank and the rendered pages
show the profile, its scores, the drawn graph and the picked feature's page.

Chromium is Debian's `chromium`; when it is missing, scripts/install_chromium.sh installs it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port, stop_process
from PIL import Image
from test_dashboard_app import labelled_feature
from test_dashboard_outputs import HUMAN_LABEL, built_outputs
from websockets.sync.client import connect

from dashboards import catalog
from dashboards.charts import KIND_COLOURS
from dashboards.features import HIGHLIGHT
from tracer.features.storage import FeaturePages

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow
INSTALL = REPO / "scripts" / "install_chromium.sh"
# Streamlit marks its root with the script state; charts are drawn by Vega into a canvas or svg.
PAGE_STATE = """(() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')];
  return JSON.stringify({
    script: app ? app.getAttribute('data-test-script-state') : null,
    charts: charts.length,
    drawn: charts.filter(c => c.querySelector('canvas, svg.marks')).length,
    skeletons: document.querySelectorAll('[data-testid="stSkeleton"]').length,
    text: document.body ? document.body.innerText : '',
  });
})()"""


def wait_for(url: str, process: subprocess.Popen, seconds: float, log: Path | None = None) -> bytes:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            if process.poll() is not None or time.monotonic() > deadline:
                output = log.read_text() if log is not None and log.exists() else ""
                raise RuntimeError(
                    f"{url} did not answer (exit {process.poll()}):\n{output}"
                ) from err
            time.sleep(0.25)


@pytest.fixture(scope="session")
def chromium() -> str:
    if shutil.which("chromium") is None:
        done = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or shutil.which("chromium") is None:
            pytest.fail(f"{INSTALL} could not install chromium:\n{done.stdout}\n{done.stderr}")
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return built_outputs(tmp_path_factory)


@contextlib.contextmanager
def serve(outputs: Path, log: Path, env: dict[str, str]) -> Iterator[str]:
    """`streamlit run dashboards/app.py -- --outputs OUTPUTS` on a free loopback port with `env`;
    yields its base URL, always stops it."""
    port = free_port()
    command = [
        sys.executable, "-m", "streamlit", "run", str(REPO / "dashboards" / "app.py"),
        "--server.address", "127.0.0.1", "--server.port", str(port),
        "--server.headless", "true", "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--", "--outputs", str(outputs),
    ]  # fmt: skip
    with log.open("w") as handle:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(f"{base}/_stcore/health", process, 60, log) == b"ok"
        yield base
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def server(root: Path, tmp_path_factory):
    """The app reading `root` (`-- --outputs`); always stopped."""
    env = dict(os.environ)
    env.pop(catalog.ENV_OUTPUTS, None)  # the argument alone must point the app at `root`
    with serve(root, tmp_path_factory.mktemp("streamlit") / "server.log", env) as base:
        yield base


class Browser:
    """Headless Chromium on a DevTools port: open a page, wait until drawn, screenshot."""

    def __init__(self, executable: str, profile_dir: Path, size: tuple[int, int]) -> None:
        port = free_port()
        self.process = subprocess.Popen(
            [
                executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--no-first-run", f"--user-data-dir={profile_dir}",
                f"--remote-debugging-port={port}", f"--window-size={size[0]},{size[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        targets = json.loads(wait_for(f"http://127.0.0.1:{port}/json/list", self.process, 30))
        page = next(t for t in targets if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=1 << 26)
        self.ids = itertools.count(1)
        # the window size includes browser chrome: fix the page's viewport itself
        width, height = size
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:  # events arrive in between; wait for our answer
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def state(self) -> dict:
        result = self.call("Runtime.evaluate", expression=PAGE_STATE, returnByValue=True)
        value = result["result"].get("value")  # none while a navigation replaces the document
        if value is None:
            return {"script": None, "charts": 0, "drawn": 0, "skeletons": 0, "text": ""}
        return json.loads(value)

    def open(self, url: str, charts: int, texts: list[str], seconds: float = 60) -> dict:
        """Load `url` and wait until the script finished, `charts` charts are drawn and every
        text is on the page; a chart gets one more second to paint after that."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + seconds
        while True:
            state = self.state()
            ready = (
                state["script"] == "notRunning"
                and state["drawn"] >= charts
                and not state["skeletons"]
                and all(t in state["text"] for t in texts)
            )
            if ready:
                time.sleep(1.0)
                return self.state()
            if time.monotonic() > deadline:
                summary = {k: v for k, v in state.items() if k != "text"}
                raise AssertionError(
                    f"{url} not ready after {seconds}s: {summary}\n{state['text']}"
                )
            time.sleep(0.25)

    def screenshot(self, path: Path) -> Image.Image:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return Image.open(path).convert("RGB")

    def close(self) -> None:
        self.socket.close()
        stop_process(self.process)


@pytest.fixture(scope="module")
def browser(chromium: str, tmp_path_factory):
    browser = Browser(chromium, tmp_path_factory.mktemp("chromium"), (1400, 1800))
    try:
        yield browser
    finally:
        browser.close()


def colour_share(image: Image.Image, hex_colour: str, tolerance: int = 12) -> float:
    """Share of pixels within `tolerance` (per channel) of a colour."""
    target = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    pixels = list(image.getdata())
    close = sum(
        all(abs(p - t) <= tolerance for p, t in zip(px, target, strict=True)) for px in pixels
    )
    return close / len(pixels)


def assert_not_blank(image: Image.Image) -> None:
    small = image.resize((350, 450))
    assert len(set(small.getdata())) > 200, "the screenshot is (nearly) one colour"


def test_a_deep_link_to_a_page_renders_first(server: str, browser: Browser, root: Path, tmp_path):
    """Runs first on the fresh server: a page opened by its URL before any other (Streamlit
    would route a `pages/` folder itself until `st.navigation` has run once)."""
    scores = pd.read_csv(root / "compare" / "scores.csv")
    best = scores.sort_values("pruned_replacement").iloc[-1]
    state = browser.open(
        f"{server}/tables", charts=1, texts=["Cross-profile tables", "pruned_replacement"]
    )
    assert "Traceback" not in state["text"] and "Error" not in state["text"]
    assert best["profile"] in state["text"]
    assert_not_blank(browser.screenshot(tmp_path / "tables.png"))


def test_graph_page_renders_in_a_browser(server: str, browser: Browser, root: Path, tmp_path):
    scores = catalog.read_scores(root, "tiny-plt", "mary")
    shown = f"{scores['pruned_replacement']:.4f}"
    state = browser.open(
        f"{server}/?profile=tiny-plt&prompt=mary",
        charts=2,  # the graph and the pruning curve
        texts=["tiny-plt / mary", shown, "Strongest incoming links"],
    )
    assert state["drawn"] == state["charts"] >= 2
    assert f"{scores['replacement']:.4f}" in state["text"]
    assert "Mary" in state["text"]  # a prompt token labels the x axis (and the prompt caption)
    image = browser.screenshot(tmp_path / "graph.png")
    assert image.size == (1400, 1800)
    assert_not_blank(image)
    # feature nodes are drawn in their colour (the page has no other use of it)
    assert colour_share(image.crop((300, 0, 1400, 1000)), KIND_COLOURS["feature"]) > 1e-4


def test_compare_page_renders_in_a_browser(server: str, browser: Browser, root: Path, tmp_path):
    state = browser.open(
        f"{server}/compare", charts=3, texts=["Compare two graphs", "Nodes shared by id"]
    )
    scores_b = catalog.read_scores(root, "tiny-plt", "dallas")
    assert f"{scores_b['pruned_replacement']:.4f}" in state["text"]
    assert "tiny-clt" in state["text"] and "tiny-plt" in state["text"]
    image = browser.screenshot(tmp_path / "compare.png")
    assert_not_blank(image)


def test_a_feature_page_renders_in_a_browser(server: str, browser: Browser, root: Path, tmp_path):
    """The graph page of tiny-clt / dallas opens on its most influential feature, which has the
    human label: its page shows the label, the examples (tokens shaded) and the histogram."""
    folder = root / "features" / "tiny-clt"
    tokens = json.loads((folder / "tokens.json").read_text())
    state = browser.open(
        f"{server}/?profile=tiny-clt&prompt=dallas",
        charts=3,  # the graph, the feature's histogram, the pruning curve
        texts=["Feature page", "Top activations", HUMAN_LABEL, "Top output logits"],
    )
    assert "Traceback" not in state["text"]
    page = FeaturePages(folder).page(*labelled_feature(root))
    top = page.top[0]
    # the top example's tokens, in the page's text (spans render without separators)
    assert "".join(tokens[str(t)] for t in top.tokens) in state["text"].replace("\n", "")
    browser.call(
        "Runtime.evaluate",
        expression="[...document.querySelectorAll('h3')]"
        ".find(e => e.innerText.startsWith('Feature page')).scrollIntoView()",
    )
    time.sleep(0.5)
    image = browser.screenshot(tmp_path / "feature.png")
    assert_not_blank(image)
    # the peak token of the top example is shaded at full strength in the highlight colour
    highlight = "#{:02x}{:02x}{:02x}".format(*HIGHLIGHT)
    assert colour_share(image, highlight, tolerance=6) > 1e-5
