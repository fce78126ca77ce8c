"""End to end in headless Chromium: the circuit loop of the explorer on the tiny outputs folder and an
MLflow store logged from it. Pin two nodes, group them into a supernode and see the subgraph score
change; ablate them on the Interventions page and see the logits change; open a past run from the
Runs page. Widgets are driven as a person would: clicks and typing through the DevTools protocol.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from test_dashboard_browser import Browser, assert_not_blank, chromium, serve  # noqa: F401
from test_dashboard_outputs import DISABLED, built_outputs

from dashboards import catalog
from tracer.experiments.tracking import log_pipeline

from mlflow import MlflowClient  # isort: skip  (after tracking, which turns telemetry off)

REPO = Path(__file__).resolve().parents[1]
PROFILE, PROMPT = "tiny-plt", "mary"  # not the first pick: the pages must pass it on

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder: a copy of the tiny outputs and an MLflow store logged from them."""
    folder = tmp_path_factory.mktemp("circuit") / "project"
    outputs = built_outputs(tmp_path_factory)
    shutil.copytree(outputs, folder / "outputs")
    shutil.copytree(outputs.parent / "models", folder / "models")  # the fetch records name it
    shutil.rmtree(folder / "outputs" / "profiles" / DISABLED)  # a stub, not a tracked profile
    log_pipeline(folder / "outputs", uri=f"sqlite:///{folder / 'mlflow.db'}")
    return folder


@pytest.fixture(scope="module")
def server(project: Path, tmp_path_factory):
    """The app on the project's outputs, its store the project's `mlflow.db` (the default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACER_"))}
    env["TRACER_RUNS_CACHE"] = str(project / "runs-cache")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    with serve(project / "outputs", log, env) as base:
        yield base


@pytest.fixture(scope="module")
def browser(chromium: str, tmp_path_factory):  # noqa: F811
    browser = Browser(chromium, tmp_path_factory.mktemp("chromium"), (1400, 1800))
    try:
        yield browser
    finally:
        browser.close()


# ---- driving widgets -----------------------------------------------------------------------------
def evaluate(browser: Browser, expression: str):
    result = browser.call("Runtime.evaluate", expression=expression, returnByValue=True)
    if "exceptionDetails" in result:
        raise AssertionError(f"{expression}: {result['exceptionDetails']}")
    return result["result"].get("value")


def click_element(browser: Browser, finder: str) -> None:
    """A real mouse click at the centre of the element `finder` (a JS expression) returns."""
    box = evaluate(
        browser,
        f"""(() => {{ const e = {finder}; if (!e) return null; e.scrollIntoView({{block: 'center'}});
        const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""",
    )
    assert box is not None, f"nothing found by {finder}"
    x, y = box
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def labelled(kind: str, label: str) -> str:
    """JS finding the widget of `data-testid` kind whose label reads `label`."""
    return (
        f"[...document.querySelectorAll('[data-testid=\"{kind}\"]')]"
        f".find(w => (w.querySelector('label')?.innerText || '').trim() === {json.dumps(label)})"
    )


def button(text: str) -> str:
    return (
        "[...document.querySelectorAll('button')]"
        f".find(b => b.innerText.trim() === {json.dumps(text)})"
    )


def press(browser: Browser, key: str, code: int) -> None:
    for kind in ("keyDown", "keyUp"):
        browser.call(
            "Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code
        )


def choose(browser: Browser, label: str, typed: str, ending: str | None = None) -> None:
    """Open the multiselect labelled `label`, type `typed` and click the option ending in
    `ending` (the menu matches loosely; by default the option of node id `typed`, which ends in
    `(typed)`)."""
    click_element(browser, f"{labelled('stMultiSelect', label)}?.querySelector('input')")
    browser.call("Input.insertText", text=typed)
    ending = f"({typed})" if ending is None else ending
    option = (
        "[...document.querySelectorAll('[role=\"option\"]')]"
        f".find(o => o.innerText.trim().endsWith({json.dumps(ending)}))"
    )
    deadline = time.monotonic() + 10
    while not evaluate(browser, f"!!{option}"):
        assert time.monotonic() < deadline, f"{label}: no option ending in {ending!r}"
        time.sleep(0.2)
    click_element(browser, option)
    press(browser, "Escape", 27)


def type_into(browser: Browser, label: str, text: str) -> None:
    click_element(browser, f"{labelled('stTextInput', label)}?.querySelector('input')")
    evaluate(browser, f"{labelled('stTextInput', label)}.querySelector('input').select()")
    browser.call("Input.insertText", text=text)
    press(browser, "Tab", 9)


def settled(browser: Browser, texts: list[str], seconds: float = 60) -> str:
    """Wait until the script is idle and every text is on the page; the page's text."""
    deadline = time.monotonic() + seconds
    while True:
        state = browser.state()
        if state["script"] == "notRunning" and all(t in state["text"] for t in texts):
            return state["text"]
        if time.monotonic() > deadline:
            raise AssertionError(f"not shown after {seconds}s: {texts}\n{state['text']}")
        time.sleep(0.25)


def until(browser: Browser, check, seconds: float = 60) -> str:
    """Wait until the script is idle and `check(page text)` holds; the page's text."""
    deadline = time.monotonic() + seconds
    while True:
        time.sleep(0.5)  # a rerun the last input started may not have begun yet
        state = browser.state()
        if state["script"] == "notRunning" and check(state["text"]):
            return state["text"]
        if time.monotonic() > deadline:
            raise AssertionError(f"not shown after {seconds}s\n{state['text']}")


def metric(text: str, label: str, line: int = 1) -> str:
    """The value (line 1) or delta (line 2) printed after a metric's label in the page's text."""
    lines = [text.strip() for text in text.splitlines() if text.strip()]
    return lines[lines.index(label) + line]


def strongest_features(project: Path, count: int) -> list[str]:
    document = catalog.read_document(project / "outputs", PROFILE, PROMPT)
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    return [n["node_id"] for n in sorted(features, key=lambda n: -n["influence"])[:count]]


# ---- the loop ------------------------------------------------------------------------------------
def test_pin_group_and_ablate_in_a_browser(server: str, browser: Browser, project: Path, tmp_path):
    browser.open(f"{server}/?profile={PROFILE}&prompt={PROMPT}", charts=1, texts=["Subgraph"])
    text = settled(browser, ["replacement (subgraph)"])
    before = metric(text, "replacement (subgraph)")
    two = strongest_features(project, 2)
    for count, node_id in enumerate(two, start=1):
        choose(browser, "pinned nodes", node_id)
        text = until(browser, lambda text, n=count: metric(text, "pinned nodes") == str(n))
    assert all(node_id in text for node_id in two)
    after = metric(text, "replacement (subgraph)")
    assert after != before

    type_into(browser, "supernode name", "capital")
    for node_id in two:
        choose(browser, "members (pinned nodes)", node_id)
    click_element(browser, button("Group as supernode"))
    text = settled(browser, ["capital (2)"])
    assert metric(text, "supernodes") == "1"
    assert "Traceback" not in text
    assert_not_blank(browser.screenshot(tmp_path / "subgraph.png"))

    # the Interventions page of the same session starts from the pinned nodes
    click_element(
        browser,
        "[...document.querySelectorAll('[data-testid=\"stSidebarNavLink\"]')]"
        ".find(a => a.href.endsWith('/interventions'))",
    )
    text = until(browser, lambda text: "Interventions: " in text and "Nodes: " in text)
    assert all(node_id in text for node_id in two)  # the pinned nodes are the default source
    time.sleep(1.0)
    click_element(browser, button("Run intervention"))
    text = settled(browser, ["Top next tokens after", "Generated text"], seconds=120)
    assert "Traceback" not in text
    # the ablation moved the next-token distribution: the top token's probability changed
    clean = float(metric(text, "top token before", 2).removeprefix("p = "))
    ablated = float(metric(text, "its probability after"))
    assert ablated != pytest.approx(clean, abs=1e-4)
    assert float(metric(text, "its probability after", 2)) == pytest.approx(
        ablated - clean, abs=2e-4
    )
    assert_not_blank(browser.screenshot(tmp_path / "intervention.png"))


def test_a_past_run_opens_from_the_runs_page(server: str, browser: Browser, project: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracer")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.run_name = 'tiny-plt/mary'"
    )
    run_id = run.info.run_id
    browser.open(f"{server}/runs", charts=0, texts=["Runs to open"])
    choose(browser, "Runs to open", "tiny-plt/mary", ending=run_id[:8])
    settled(browser, ["Open in Graph page"])
    click_element(browser, button("Open in Graph page"))
    title = f"tiny-plt@{run_id[:8]} / mary"
    text = settled(browser, [title, "replacement (pruned)"], seconds=90)
    scores = catalog.read_scores(project / "outputs", "tiny-plt", "mary")
    assert metric(text, "replacement (pruned)") == f"{scores['pruned_replacement']:.4f}"
    assert metric(text, "replacement (full)") == f"{scores['replacement']:.4f}"
    assert run_id in text  # the sidebar says which run is shown
    assert "Traceback" not in text
