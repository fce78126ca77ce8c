"""The dashboard's reading of an outputs folder, on a real tiny one built here with the library.

`build_outputs` writes what `dvc repro` writes (two profiles of one tiny GPT-2, a CLT and a PLT,
two prompts each, a disabled profile, the compare tables, each set's feature pages over a few
thousand tokens) and, beside it, a labels file with one human label; the other dashboard tests
reuse it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from dashboards import catalog
from dashboards.catalog import MissingOutputs
from tracer.atomic import write_json
from tracer.attribution.attribute import attribute
from tracer.experiments import outputs as paths
from tracer.experiments.compare import write_tables
from tracer.experiments.fetch import folder_sha256
from tracer.experiments.report import prompt_report
from tracer.features.labels import set_label
from tracer.features.pages import PageSettings, collect_pages, examples_from_texts
from tracer.features.storage import FeaturePages, save_pages
from tracer.graph.graph import Graph
from tracer.graph.summary import prune_graph
from tracer.interventions.validation import validate_graph
from tracer.model.replacement import ReplacementModel, load_model
from tracer.testing import FIXTURE_WORDS, build_model, build_tokenizer, build_transcoders
from tracer.transcoders.files import save_transcoders

REPO = Path(__file__).resolve().parents[1]

N_LAYERS, D_MODEL = 3, 32
MODEL = "tiny/gpt2"
MODEL_FOLDER = "models/tiny-gpt2"  # beside the outputs folder, as fetch@PROFILE records it
PROFILES = {"tiny-clt": "clt", "tiny-plt": "plt-jumprelu"}
VALIDATED = "tiny-clt"  # the other profile has no validate-stage output
DISABLED = "tiny-hub"
PROMPTS = {
    "dallas": "the capital of the state containing Dallas is",
    "mary": "when Mary and John went to the store John gave a book to",
}
THRESHOLDS = (0.7, 0.95)  # not Graph.prune's defaults: the app must use the stored ones
SWEEP = [(0.5, 0.9), (0.7, 0.95), (0.9, 0.99)]
PAGE_SETTINGS = PageSettings(
    n_tokens=3000,
    context=9,
    top_k=5,
    quantiles=(0.5, 0.9),
    examples_per_band=3,
    histogram_bins=16,
    batch_size=64,
    n_logits=5,
)
HUMAN_LABEL = "capital city detector"  # given to tiny-clt's most influential dallas feature
_BUILT: dict[str, Path] = {}


def build_outputs(root: Path) -> Path:
    """Write, in `tracer.experiments.outputs`' layout, what the fetch, attribute, prune, validate and
    compare stages write: fetch records (the tiny model saved beside the outputs folder), graphs,
    pruned documents, scores, one curve image, validation for one profile."""
    tokenizer = build_tokenizer()
    model = build_model("gpt2", n_layers=N_LAYERS, d_model=D_MODEL, vocab=len(tokenizer))
    model_folder = save_model(model, tokenizer, catalog.project_folder(root) / MODEL_FOLDER)
    for name, kind in PROFILES.items():
        transcoders = build_transcoders(kind, n_layers=N_LAYERS, d_model=D_MODEL, seed=3)
        sets = save_transcoders(transcoders, root / "sets" / kind, overwrite=True)
        write_fetched(root, name, model_folder, sets)
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
        write_pages(root, name, replacement, tokenizer, info)
    Image.new("RGB", (60, 40), "white").save(
        paths.prompt_dir(root, VALIDATED, "dallas") / paths.CURVE_PLOT
    )
    disabled = {"name": DISABLED, "model": "org/big", "transcoders": "hf://org/sets"}
    write_json(paths.profile_dir(root, DISABLED) / "profile.json", disabled | {"enabled": False})
    write_tables(root, root / "compare")
    document = json.loads((paths.prompt_dir(root, VALIDATED, "dallas") / "pruned.json").read_text())
    top = max(
        (n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"),
        key=lambda n: n["influence"],
    )
    layer, feature, _ = map(int, top["node_id"].split("_"))
    pages = FeaturePages(paths.features_dir(root, VALIDATED))
    set_label(catalog.labels_folder(root) / f"{VALIDATED}.tsv", pages, layer, feature, HUMAN_LABEL)
    return root


def save_model(model, tokenizer, folder: Path) -> Path:
    """The tiny model and tokenizer as a local model folder, checked to load back the same."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder))
    ids = torch.tensor([[0, 5, 9, 17, 3]])
    with torch.no_grad():
        if not torch.equal(loaded(ids).logits, model(ids).logits):
            raise AssertionError(f"{folder}: the saved model gives other logits")
    return folder


def write_fetched(root: Path, name: str, model_folder: Path, sets: Path) -> None:
    """What fetch@NAME records for local folders: the model by its path relative to the folder
    holding the outputs (as params.yaml names `zoo/models/...`), the set by its absolute path."""
    relative = model_folder.relative_to(catalog.project_folder(root)).as_posix()
    record = {
        "dtype": "float32",
        "enabled": True,
        "model": {"path": relative, "source": relative, "revision": None},
        "transcoders": {"path": str(sets), "source": str(sets), "revision": None},
    }
    record["model"]["sha256"] = folder_sha256(model_folder)
    record["transcoders"]["sha256"] = folder_sha256(sets)
    write_json(paths.fetched_dir(root, name) / paths.FETCHED_FILE, record)


def write_pages(root: Path, name: str, model: ReplacementModel, tokenizer, info: dict) -> None:
    """What features@NAME writes for the profile's set: pages over random fixture-word texts."""
    rng = random.Random(7)
    texts = [" ".join(rng.choices(FIXTURE_WORDS, k=12)) for _ in range(400)]
    examples = examples_from_texts(model, texts, PAGE_SETTINGS)
    pages = collect_pages(model, examples, PAGE_SETTINGS)
    identity = {"name": name, "profile": name, "model": MODEL}
    identity |= {"transcoders": info["transcoders"], "transcoder_revision": None}
    save_pages(
        paths.features_dir(root, name),
        pages,
        PAGE_SETTINGS,
        lambda ids: [tokenizer.decode([i]) for i in ids],
        identity,
    )


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


def test_label_editing_from_argument_then_environment():
    env = catalog.ENV_EDIT_LABELS
    assert catalog.label_editing(["--outputs", "/x", "--edit-labels"], {})
    assert catalog.label_editing([], {env: "1"}) and catalog.label_editing([], {env: " TRUE "})
    assert not catalog.label_editing([], {}) and not catalog.label_editing([], {env: "0"})
    assert not catalog.label_editing(["--edit-label"], {})  # no abbreviations
    with pytest.raises(ValueError, match=r"TRACER_EDIT_LABELS must be one of .*got 'maybe'"):
        catalog.label_editing([], {env: "maybe"})
    # the flag does not disturb the outputs argument
    assert catalog.resolve_outputs(["--edit-labels", "--outputs", "/y"], {}) == Path("/y")


def test_each_profile_finds_the_pages_of_its_transcoders(root: Path):
    outputs = catalog.scan_outputs(root)
    for profile in outputs.profiles:
        found = catalog.find_pages(root, profile)
        index = json.loads((found.folder / "index.json").read_text())
        assert index["transcoders"] == profile.info["transcoders"]
        assert found.folder == root / "features" / found.name
        assert found.labels == root.parent / "labels" / f"{found.name}.tsv"
    # a second profile of the same transcoder set shares the pages
    clt = outputs.profile("tiny-clt")
    twin = catalog.Profile("tiny-clt-again", clt.info | {"name": "tiny-clt-again"}, clt.prompts)
    assert catalog.find_pages(root, twin).name == "tiny-clt"


def test_pages_of_other_weights_are_not_taken(root: Path, tmp_path: Path):
    """The fetch stage's record wins over profile.json: pages built from another revision of the
    set are not this profile's; nor are pages of another set."""
    copy = tmp_path / "outputs"
    shutil.copytree(root / "features", copy / "features")
    profile = catalog.scan_outputs(root).profile("tiny-plt")
    assert catalog.find_pages(copy, profile).name == "tiny-plt"
    record = {"source": profile.info["transcoders"], "revision": "0123abcd"}
    write_json(paths.fetched_dir(copy, "tiny-plt") / "fetched.json", {"transcoders": record})
    with pytest.raises(MissingOutputs, match=r"No feature pages .*tiny-plt.*dvc repro features@"):
        catalog.find_pages(copy, profile)
    # params.yaml beside the outputs folder names the stage
    params = {
        "zoo": {"models": {}, "transcoders": {}},
        "profiles": {"tiny-plt": {"model": str(root), "transcoders": record["source"]}},
        "prompts": [{"id": "dallas", "text": PROMPTS["dallas"]}],
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(MissingOutputs, match=r"add `NAME: tiny-plt` under `features.sets`"):
        catalog.find_pages(copy, profile)
    params["features"] = {"sets": {"plt-pages": "tiny-plt"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(MissingOutputs, match=r"run `dvc repro features@plt-pages`"):
        catalog.find_pages(copy, profile)
    moved = catalog.Profile("p", {"transcoders": "/elsewhere/set"}, ("q",))
    with pytest.raises(MissingOutputs, match=r"/elsewhere/set.*`dvc repro features@SET`"):
        catalog.find_pages(copy, moved)
    with pytest.raises(MissingOutputs, match="features@"):
        catalog.find_pages(tmp_path / "empty", profile)
