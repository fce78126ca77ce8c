"""The dashboard's reading of an outputs folder, on a real tiny one built here with the library.

`build_outputs` writes what `dvc repro` writes (two profiles of one tiny GPT-2, a CLT and a PLT,
two prompts each, a disabled profile, the compare tables); the other dashboard tests reuse it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dashboards import catalog
from dashboards.catalog import MissingOutputs
from tracer.atomic import write_json
from tracer.attribution.attribute import attribute
from tracer.experiments import outputs as paths
from tracer.experiments.compare import write_tables
from tracer.experiments.report import prompt_report
from tracer.graph.graph import Graph
from tracer.graph.summary import prune_graph
from tracer.interventions.validation import validate_graph
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_tokenizer, build_transcoders
from tracer.transcoders.files import save_transcoders

REPO = Path(__file__).resolve().parents[1]

N_LAYERS, D_MODEL = 3, 32
MODEL = "tiny/gpt2"
PROFILES = {"tiny-clt": "clt", "tiny-plt": "plt-jumprelu"}
VALIDATED = "tiny-clt"  # the other profile has no validate-stage output
DISABLED = "tiny-hub"
PROMPTS = {
    "dallas": "the capital of the state containing Dallas is",
    "mary": "when Mary and John went to the store John gave a book to",
}
THRESHOLDS = (0.7, 0.95)  # not Graph.prune's defaults: the app must use the stored ones
SWEEP = [(0.5, 0.9), (0.7, 0.95), (0.9, 0.99)]
_BUILT: dict[str, Path] = {}


def build_outputs(root: Path) -> Path:
    """Write, in `tracer.experiments.outputs`' layout, what the attribute, prune, validate and compare stages
    write: graphs, pruned documents, scores, one curve image, validation for one profile."""
    tokenizer = build_tokenizer()
    model = build_model("gpt2", n_layers=N_LAYERS, d_model=D_MODEL, vocab=len(tokenizer))
    for name, kind in PROFILES.items():
        transcoders = build_transcoders(kind, n_layers=N_LAYERS, d_model=D_MODEL, seed=3)
        sets = save_transcoders(transcoders, root / "sets" / kind, overwrite=True)
        replacement = ReplacementModel(model, transcoders, tokenizer=tokenizer, model_id=MODEL)
        info = {"name": name, "model": MODEL, "transcoders": str(sets), "revision": None}
        info |= {"transcoder_revision": None, "dtype": "float32", "enabled": True}
        write_json(paths.graphs_dir(root, name) / paths.PROFILE_FILE, info)
        write_json(paths.profile_dir(root, name) / paths.PROFILE_FILE, info)
        for prompt, text in PROMPTS.items():
            graph = attribute(text, replacement, progress=False)
            graph.save(paths.graph_path(root, name, prompt))
            folder = paths.prompt_dir(root, name, prompt)
            pruned = prune_graph(graph, *THRESHOLDS, slug=f"{name}-{prompt}", tokenizer=tokenizer)
            write_json(folder / paths.PRUNED_FILE, pruned.document)
            report = prompt_report(graph, pruned, SWEEP)
            write_json(folder / paths.SCORES_FILE, report)
            if name == VALIDATED:
                validation = validate_graph(graph, replacement, top_n=4, modes=("direct",))
                validation.to_json(paths.validation_dir(root, name) / f"{prompt}.json")
    Image.new("RGB", (60, 40), "white").save(
        paths.prompt_dir(root, VALIDATED, "dallas") / paths.CURVE_PLOT
    )
    disabled = {"name": DISABLED, "model": "org/big", "transcoders": "hf://org/sets"}
    write_json(paths.profile_dir(root, DISABLED) / "profile.json", disabled | {"enabled": False})
    write_tables(root, root / "compare")
    return root


def built_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny outputs folder, built once per test session (shared by the dashboard tests)."""
    if "root" not in _BUILT:
        _BUILT["root"] = build_outputs(tmp_path_factory.mktemp("dashboard") / "outputs")
    return _BUILT["root"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return built_outputs(tmp_path_factory)


# ---- tests --------------------------------------------------------------------------------------
def test_outputs_folder_from_argument_then_environment_then_default():
    env = {catalog.ENV_OUTPUTS: "/from/env"}
    assert catalog.resolve_outputs(["--outputs", "/from/arg", "--other"], env) == Path("/from/arg")
    assert catalog.resolve_outputs(["--outputs=/x"], {}) == Path("/x")
    assert catalog.resolve_outputs(["--unrelated", "1"], env) == Path("/from/env")
    assert catalog.resolve_outputs([], {}) == Path("outputs")
    assert catalog.resolve_outputs(["--output", "/abbrev"], {}) == Path("outputs")


def test_scan_finds_enabled_profiles_and_says_why_others_are_left_out(root: Path):
    outputs = catalog.scan_outputs(root)
    assert [p.name for p in outputs.profiles] == sorted(PROFILES)
    for profile in outputs.profiles:
        assert profile.prompts == tuple(sorted(PROMPTS))
        assert profile.info == json.loads(
            (root / "profiles" / profile.name / "profile.json").read_text()
        )
    assert list(outputs.skipped) == [DISABLED]
    assert "enabled: true" in outputs.skipped[DISABLED] and "dvc repro" in outputs.skipped[DISABLED]
    assert catalog.default_pair(outputs) == ("tiny-clt", "tiny-plt")


def test_missing_folders_name_the_command(tmp_path: Path):
    with pytest.raises(MissingOutputs, match="dvc repro"):
        catalog.scan_outputs(tmp_path / "nowhere")
    with pytest.raises(MissingOutputs, match=r"dvc repro.*`attribute` and\s+`prune`"):
        catalog.scan_outputs(tmp_path)
    write_json(paths.graphs_dir(tmp_path, "p") / "profile.json", {"name": "p", "enabled": True})
    with pytest.raises(MissingOutputs, match="p: attributed but not pruned yet"):
        catalog.scan_outputs(tmp_path)
    write_json(paths.profile_dir(tmp_path, "p") / "profile.json", {"name": "p", "enabled": True})
    with pytest.raises(MissingOutputs, match="p: no pruned graphs yet"):
        catalog.scan_outputs(tmp_path)
    with pytest.raises(MissingOutputs, match=r"dvc repro.*compare"):
        catalog.read_compare(tmp_path)
    with pytest.raises(MissingOutputs, match=r"scores.json` is missing: run `dvc repro`"):
        catalog.read_scores(tmp_path, "p", "q")
    with pytest.raises(MissingOutputs, match=r"validate"):
        catalog.read_validation(tmp_path, "p", "q")
    assert catalog.graph_file(tmp_path, "p", "q") is None  # e.g. a DVC-cached graph not pulled
    assert catalog.read_run(tmp_path, "p", "q") is None


def test_prompt_files_and_thresholds(root: Path):
    document = catalog.read_document(root, "tiny-plt", "mary")
    scores = catalog.read_scores(root, "tiny-plt", "mary")
    folder = root / "profiles" / "tiny-plt" / "mary"
    assert document == json.loads((folder / "pruned.json").read_text())
    assert scores == json.loads((folder / "scores.json").read_text())
    assert scores["pruned_nodes"] == len(document["nodes"])
    assert catalog.default_thresholds(document, scores) == THRESHOLDS
    without = {"metadata": {}, "nodes": [], "links": []}
    assert catalog.default_thresholds(without, scores) == THRESHOLDS
    assert catalog.default_thresholds(without) == (0.8, 0.98)
    path = catalog.graph_file(root, "tiny-plt", "mary")
    assert path == root / "graphs" / "tiny-plt" / "mary.safetensors"
    assert Graph.load(path).input_string == PROMPTS["mary"]
    report = catalog.read_validation(root, VALIDATED, "mary")
    assert set(report) == {"metadata", "summary", "rows"}


def test_compare_tables_are_the_csv_files(root: Path):
    tables, summary = catalog.read_compare(root)
    assert set(tables) == set(catalog.COMPARE_TABLES)
    assert summary["profiles"] == sorted(PROFILES)
    scores = tables["scores"]
    assert len(scores) == len(PROFILES) * len(PROMPTS)
    row = scores[(scores["profile"] == "tiny-clt") & (scores["prompt"] == "dallas")].iloc[0]
    stored = catalog.read_scores(root, "tiny-clt", "dallas")
    assert row["pruned_replacement"] == pytest.approx(stored["pruned_replacement"])
    assert sorted(set(tables["matching"]["layer"])) == list(range(N_LAYERS))


def test_filtering_a_compare_table(root: Path):
    tables, _ = catalog.read_compare(root)
    matching = tables["matching"]
    both = catalog.filter_rows(matching, sorted(PROFILES), ["mary"])
    assert set(both["prompt"]) == {"mary"} and len(both) == len(matching) / len(PROMPTS)
    assert catalog.filter_rows(matching, ["tiny-clt"], list(PROMPTS)).empty  # pairs need both
    scores = catalog.filter_rows(tables["scores"], ["tiny-plt"], ["dallas", "mary"])
    assert list(scores["profile"]) == ["tiny-plt", "tiny-plt"]


def test_matching_rows_of_one_pair(root: Path):
    matching = catalog.read_compare(root)[0]["matching"]
    rows, summary = catalog.matching_rows(root, "tiny-plt", "tiny-clt", "mary")
    expected = matching[
        (matching["profile_a"] == "tiny-plt")
        & (matching["profile_b"] == "tiny-clt")
        & (matching["prompt"] == "mary")
    ]
    assert rows.equals(expected) and len(rows) == N_LAYERS
    assert summary == json.loads((root / "compare" / "summary.json").read_text())
    every_prompt, _ = catalog.matching_rows(root, "tiny-plt", "tiny-clt")
    assert len(every_prompt) == N_LAYERS * len(PROMPTS)
    with pytest.raises(MissingOutputs, match="No matching rows for tiny-plt -> tiny-plt"):
        catalog.matching_rows(root, "tiny-plt", "tiny-plt")
