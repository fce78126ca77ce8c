"""Cross-profile tables on a real tiny `outputs/` tree: graphs attributed under transcoder sets
saved to disk (a set, the same set saved twice, the set with its features permuted, an unrelated
CLT), checked against numbers recomputed here from the graph files and the weights."""

from __future__ import annotations

import csv
import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch

from tracer.atomic import write_json
from tracer.attribution.attribute import attribute
from tracer.experiments import compare, outputs
from tracer.experiments.report import prompt_report
from tracer.graph.graph import Graph
from tracer.graph.summary import prune_graph
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_transcoders
from tracer.transcoders.files import load_transcoders, save_transcoders
from tracer.transcoders.sets import LayerWeights, TranscoderSet

N_LAYERS, D_MODEL, D_TC = 2, 32, 48
PROMPTS = {"alpha": [0, 5, 9, 13, 22, 7, 30], "beta": [0, 40, 3, 17, 8, 12]}
THRESHOLDS = (0.7, 0.95)  # not Graph.prune's defaults, so using the stored ones is checked
CURVE = [(0.5, 0.9), (0.7, 0.95), (0.9, 0.99)]
MODEL = "tiny/gpt2"
SAME_MODEL = ("a", "a-copy", "perm", "random")  # enabled, one model, with graphs
OUT_FILES = {
    "scores.csv",
    "sizes.csv",
    "layers.csv",
    "matching.csv",
    "features.csv",
    "summary.json",
}
PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


# ---- transcoder sets ---------------------------------------------------------------------------
def permutations(seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(D_TC, generator=gen) for _ in range(N_LAYERS)]


def permuted(ts: TranscoderSet, perms: list[torch.Tensor]) -> TranscoderSet:
    """The same set with feature j of layer i moved from index perms[i][j] to index j."""
    layers = []
    for i, perm in enumerate(perms):
        w = ts.layer(i)
        layers.append(
            LayerWeights(
                W_enc=w.W_enc[perm],
                b_enc=w.b_enc[perm],
                W_dec=w.W_dec[perm],
                b_dec=w.b_dec,
                threshold=None if w.threshold is None else w.threshold[perm],
                W_skip=w.W_skip,
            )
        )
    return TranscoderSet.from_layers(
        layers,
        activation=ts.activation,
        cross_layer=ts.cross_layer,
        feature_input_hook=ts.feature_input_hook,
        feature_output_hook=ts.feature_output_hook,
    )


def clt_with_own_decoder(own: list[torch.Tensor], seed: int) -> TranscoderSet:
    """A random CLT whose slot-0 decoders are `own[i]` (d_tc, d_model); every other weight and
    slot is unrelated random."""
    ts = build_transcoders("clt", n_layers=N_LAYERS, d_model=D_MODEL, seed=seed)
    for i, dec in enumerate(own):
        ts.layer(i).W_dec[:, 0] = dec
    return ts


def brute_force_match(ts_a: TranscoderSet, ts_b: TranscoderSet, layer: int) -> torch.Tensor:
    """(d_tc_a,) index of the B feature with the most cosine-similar own-layer decoder."""
    dec_a = ts_a.layer(layer).W_dec
    dec_b = ts_b.layer(layer).W_dec
    dec_a = dec_a[:, 0] if ts_a.cross_layer else dec_a
    dec_b = dec_b[:, 0] if ts_b.cross_layer else dec_b
    cos = torch.nn.functional.cosine_similarity(dec_a[:, None, :], dec_b[None, :, :], dim=-1)
    return cos.argmax(dim=1)


# ---- the graphs stage's files, written with tracer's own functions ------------------------------
def write_prompt(graph: Graph, root: Path, profile: str, prompt: str) -> None:
    """The graph file and scores.json as the attribute and prune stages write them."""
    scores = prompt_report(graph, prune_graph(graph, *THRESHOLDS), CURVE)
    graph.save(outputs.graph_path(root, profile, prompt))
    write_json(outputs.prompt_dir(root, profile, prompt) / "scores.json", scores)


def write_profile_json(
    folder: Path, transcoders: Path, *, model: str = MODEL, enabled: bool = True
) -> None:
    info = {
        "name": folder.name,
        "model": model,
        "transcoders": str(transcoders),
        "revision": None,
        "transcoder_revision": None,
        "dtype": "float32",
        "enabled": enabled,
    }
    write_json(folder / "profile.json", info)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """outputs/profiles with 4 same-model profiles x 2 prompts, one on another model, a disabled
    one and one without graphs; transcoder sets saved next to it."""
    base = tmp_path_factory.mktemp("compare")
    root, sets = base / "outputs", base / "transcoders"
    perms = permutations()
    plt = build_transcoders("plt-jumprelu", n_layers=N_LAYERS, d_model=D_MODEL, seed=0)
    unrelated = build_transcoders("clt", n_layers=N_LAYERS, d_model=D_MODEL, seed=1)
    named = {"a": plt, "a-copy": plt, "perm": permuted(plt, perms), "random": unrelated}
    for name, ts in named.items():
        save_transcoders(ts, sets / name)
        model = ReplacementModel(build_model("gpt2"), load_transcoders(sets / name), model_id=MODEL)
        folder = root / "profiles" / name
        write_profile_json(folder, sets / name)
        for prompt, ids in PROMPTS.items():
            graph = attribute(ids, model, max_n_logits=3, progress=False)
            write_prompt(graph, root, name, prompt)
    profiles = root / "profiles"
    shutil.copytree(profiles / "a", profiles / "other-model")
    shutil.copytree(root / "graphs" / "a", root / "graphs" / "other-model")
    write_profile_json(profiles / "other-model", sets / "a", model="tiny/other")
    shutil.copytree(profiles / "a", profiles / "off")
    write_profile_json(profiles / "off", sets / "a", enabled=False)
    (profiles / "empty" / "alpha").mkdir(parents=True)  # a prompt folder without a graph
    write_profile_json(profiles / "empty", sets / "a")
    (profiles / ".a.tmp123").mkdir()  # a stage's temporary folder: ignored
    return {"root": root, "sets": sets, "perms": perms}


def graph_of(tree: dict, profile: str, prompt: str) -> Graph:
    return Graph.load(outputs.graph_path(tree["root"], profile, prompt))


def scores_json(tree: dict, profile: str, prompt: str) -> dict:
    return json.loads((tree["root"] / "profiles" / profile / prompt / "scores.json").read_text())


# ---- scores and sizes ---------------------------------------------------------------------------
def test_scores_table_matches_files_and_recomputed_scores(tree):
    rows = compare.scores_table(tree["root"])
    profiles = sorted([*SAME_MODEL, "other-model"])
    assert [(r["profile"], r["prompt"]) for r in rows] == [
        (p, q) for p in profiles for q in sorted(PROMPTS)
    ]
    for row in rows:
        stored = scores_json(tree, row["profile"], row["prompt"])
        assert tuple(row) == compare.SCORES_COLUMNS
        assert {k: row[k] for k in compare.SCORE_FIELDS} == {
            k: stored[k] for k in compare.SCORE_FIELDS
        }
        graph = graph_of(tree, row["profile"], row["prompt"])
        result = graph.prune(*THRESHOLDS)
        assert row["replacement"] == pytest.approx(graph.scores().replacement, abs=1e-6)
        assert row["pruned_completeness"] == pytest.approx(
            graph.scores(result).completeness, abs=1e-6
        )
        assert row["pruned_nodes"] == int(result.node_mask.sum())
        assert row["pruned_edges"] == int(result.edge_mask.sum())
        assert row["active_features"] == graph.active_features.shape[0]


def test_sizes_table_has_one_row_per_curve_point(tree):
    rows = compare.sizes_table(tree["root"])
    assert len(rows) == 5 * len(PROMPTS) * len(CURVE)
    for row in rows:
        assert tuple(row) == compare.SIZES_COLUMNS
    for profile in ("a", "random"):
        for prompt in PROMPTS:
            mine = [r for r in rows if (r["profile"], r["prompt"]) == (profile, prompt)]
            curve = scores_json(tree, profile, prompt)["curve"]
            assert [{k: r[k] for k in compare.CURVE_FIELDS} for r in mine] == curve
            graph = graph_of(tree, profile, prompt)
            for row in mine:
                result = graph.prune(row["node_threshold"], row["edge_threshold"])
                assert row["nodes"] == int(result.node_mask.sum())
                assert row["edges"] == int(result.edge_mask.sum())


# ---- influence per layer ------------------------------------------------------------------------
def test_layer_table_sums_node_influence_by_layer(tree):
    for profile in ("a", "random"):
        for prompt in PROMPTS:
            graph = graph_of(tree, profile, prompt)
            influence = graph.node_influence().double()
            n_features, n_pos = graph.selected_features.shape[0], graph.n_pos
            layers = graph.active_features[graph.selected_features, 0]
            rows = compare.layer_table(graph)
            assert [r["layer"] for r in rows] == list(range(N_LAYERS))
            for layer, row in enumerate(rows):
                features = influence[:n_features][layers == layer].sum().item()
                start = n_features + layer * n_pos
                errors = sum(influence[start + pos].item() for pos in range(n_pos))
                assert row["feature_nodes"] == int((layers == layer).sum())
                assert row["feature_influence"] == pytest.approx(features, rel=1e-9, abs=1e-12)
                assert row["error_influence"] == pytest.approx(errors, rel=1e-9, abs=1e-12)
                assert 0 <= row["error_share"] <= 1
                assert row["error_share"] == pytest.approx(errors / (features + errors))
            assert errors > 0  # random transcoders leave error: the share is not trivially 0
            total = sum(r["feature_influence"] + r["error_influence"] for r in rows)
            assert total == pytest.approx(influence[: n_features + N_LAYERS * n_pos].sum().item())


def test_layers_table_covers_every_profile_prompt_and_layer(tree):
    rows = compare.layers_table(tree["root"])
    keys = {(r["profile"], r["prompt"], r["layer"]) for r in rows}
    profiles = [*SAME_MODEL, "other-model"]
    assert keys == {(p, q, i) for p in profiles for q in PROMPTS for i in range(N_LAYERS)}
    assert len(rows) == len(keys)
    row = next(r for r in rows if (r["profile"], r["prompt"], r["layer"]) == ("perm", "beta", 1))
    expected = compare.layer_table(graph_of(tree, "perm", "beta"))[1]
    assert {k: row[k] for k in compare.LAYER_FIELDS} == expected


# ---- feature matching ---------------------------------------------------------------------------
def test_match_features_of_a_set_with_itself_is_the_identity(tree):
    ts_a, ts_b = load_transcoders(tree["sets"] / "a"), load_transcoders(tree["sets"] / "a-copy")
    for layer in range(N_LAYERS):
        match = compare.match_features(ts_a, ts_b, layer)
        assert torch.equal(match.indices, torch.arange(D_TC))
        torch.testing.assert_close(match.similarity, torch.ones(D_TC), atol=1e-6, rtol=0)


def test_match_features_recovers_a_permutation(tree):
    ts_a, ts_b = load_transcoders(tree["sets"] / "a"), load_transcoders(tree["sets"] / "perm")
    for layer, perm in enumerate(tree["perms"]):
        match = compare.match_features(ts_a, ts_b, layer, chunk=7)  # several uneven blocks
        # B's feature j is A's feature perm[j], so A's perm[j] must match j.
        assert torch.equal(match.indices[perm], torch.arange(D_TC))
        torch.testing.assert_close(match.similarity, torch.ones(D_TC), atol=1e-6, rtol=0)


def test_match_features_uses_a_clt_own_layer_slot():
    plt = build_transcoders("plt-jumprelu", n_layers=N_LAYERS, d_model=D_MODEL, seed=3)
    perms = permutations(seed=11)
    clt = clt_with_own_decoder([plt.layer(i).W_dec[p] for i, p in enumerate(perms)], seed=4)
    other = clt_with_own_decoder([clt.layer(i).W_dec[:, 0] for i in range(N_LAYERS)], seed=5)
    for layer, perm in enumerate(perms):
        assert torch.equal(
            compare.match_features(plt, clt, layer).indices[perm], torch.arange(D_TC)
        )
        # CLT -> CLT: only slot 0 agrees (layer 0 also has a random slot 1).
        match = compare.match_features(clt, other, layer)
        assert torch.equal(match.indices, torch.arange(D_TC))
        torch.testing.assert_close(match.similarity, torch.ones(D_TC), atol=1e-6, rtol=0)


def test_match_features_of_unrelated_sets_is_weak(tree):
    ts_a, ts_b = load_transcoders(tree["sets"] / "a"), load_transcoders(tree["sets"] / "random")
    for layer in range(N_LAYERS):
        match = compare.match_features(ts_a, ts_b, layer)
        assert torch.equal(match.indices, brute_force_match(ts_a, ts_b, layer))
        assert float(match.similarity.mean()) < 0.5


def test_match_features_rejects_sets_of_different_models(tree):
    ts_a = load_transcoders(tree["sets"] / "a")
    wide = build_transcoders("plt-relu", n_layers=N_LAYERS, d_model=D_MODEL + 8)
    with pytest.raises(ValueError, match="d_model"):
        compare.match_features(ts_a, wide, 0)


# ---- matching table: what the matching implies for the pruned graphs ---------------------------
def kept_nodes(graph: Graph) -> set[tuple[int, int, int]]:
    """(layer, pos, feature) of the kept feature nodes at the stored thresholds."""
    result = graph.prune(*THRESHOLDS)
    kept = []
    for node in range(graph.selected_features.shape[0]):
        if result.node_mask[node]:
            kept.append(tuple(graph.active_features[graph.selected_features[node]].tolist()))
    return set(kept)


def test_graph_overlap_counts_many_to_one_matches_per_a_node():
    # Layer 0: A features 0 and 1 both match B feature 5, A feature 3 matches B feature 7.
    indices = torch.zeros(D_TC, dtype=torch.long)
    indices[[0, 1, 3]] = torch.tensor([5, 5, 7])
    matches = [compare.FeatureMatch(indices, torch.zeros(D_TC)) for _ in range(N_LAYERS)]
    kept_a = torch.tensor([[0, 1, 0], [0, 1, 1], [0, 2, 3], [1, 4, 0]])
    kept_b = torch.tensor([[0, 1, 5], [0, 3, 9]])
    layer0, layer1 = compare.graph_overlap(kept_a, kept_b, matches)
    # Images of A's layer-0 nodes: (1, 5), (1, 5), (2, 7); B's: (1, 5), (3, 9).
    assert (layer0["a_nodes"], layer0["b_nodes"], layer0["a_nodes_kept_in_b"]) == (3, 2, 2)
    assert (layer0["shared_nodes"], layer0["union_nodes"]) == (1, 3)
    assert layer0["kept_fraction"] == 2 / 3 and layer0["jaccard"] == 1 / 3
    # Layer 1: one A node, none in B.
    assert (layer1["a_nodes"], layer1["b_nodes"], layer1["kept_fraction"]) == (1, 0, 0.0)
    assert layer1["jaccard"] == 0.0
    empty = compare.graph_overlap(kept_a[:0], kept_b[:0], matches)[0]
    assert empty["kept_fraction"] is None and empty["jaccard"] is None


@pytest.fixture(scope="module")
def matching(tree) -> list[dict]:
    return compare.matching_table(tree["root"])


def rows_for(matching: list[dict], a: str, b: str) -> list[dict]:
    return [r for r in matching if (r["profile_a"], r["profile_b"]) == (a, b)]


def test_matching_table_pairs_every_same_model_profile_both_ways(matching):
    pairs = {(r["profile_a"], r["profile_b"]) for r in matching}
    assert pairs == {(a, b) for a in SAME_MODEL for b in SAME_MODEL if a != b}
    assert len(matching) == len(pairs) * len(PROMPTS) * N_LAYERS
    for row in matching:
        assert tuple(row) == compare.MATCHING_COLUMNS


@pytest.mark.parametrize("b", ["a-copy", "perm"])
def test_identical_and_permuted_sets_imply_identical_graphs(tree, matching, b):
    rows = rows_for(matching, "a", b)
    assert {(r["prompt"], r["layer"]) for r in rows} == {
        (q, i) for q in PROMPTS for i in range(N_LAYERS)
    }
    for row in rows:
        assert row["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert row["frac_cosine_above"] == 1.0
        assert row["a_nodes"] == row["b_nodes"] == row["shared_nodes"] == row["union_nodes"]
        if row["a_nodes"]:
            assert row["kept_fraction"] == 1.0
            assert row["jaccard"] == 1.0
    assert sum(r["a_nodes"] for r in rows) > 0
    for prompt in PROMPTS:
        expected = kept_nodes(graph_of(tree, "a", prompt))
        found = sum(r["a_nodes"] for r in rows if r["prompt"] == prompt)
        assert found == len(expected)


def test_unrelated_sets_overlap_as_brute_force_says(tree, matching):
    ts_a, ts_b = load_transcoders(tree["sets"] / "a"), load_transcoders(tree["sets"] / "random")
    best = [brute_force_match(ts_a, ts_b, layer) for layer in range(N_LAYERS)]
    rows = rows_for(matching, "a", "random")
    for prompt in PROMPTS:
        kept_a = kept_nodes(graph_of(tree, "a", prompt))
        kept_b = kept_nodes(graph_of(tree, "random", prompt))
        for layer in range(N_LAYERS):
            row = next(r for r in rows if (r["prompt"], r["layer"]) == (prompt, layer))
            assert row["mean_cosine"] < 0.5
            a_list = [(p, int(best[layer][f])) for (i, p, f) in kept_a if i == layer]
            b_set = {(p, f) for (i, p, f) in kept_b if i == layer}
            hits = sum(node in b_set for node in a_list)
            union = set(a_list) | b_set
            assert row["a_nodes"] == len(a_list)
            assert row["b_nodes"] == len(b_set)
            assert row["a_nodes_kept_in_b"] == hits
            assert row["kept_fraction"] == (hits / len(a_list) if a_list else None)
            assert row["jaccard"] == (len(set(a_list) & b_set) / len(union) if union else None)


# ---- files --------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def as_cells(rows: list[dict]) -> list[dict]:
    return [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows]


def test_write_tables_writes_every_table_and_skips_what_it_must(tree, matching, tmp_path):
    out = tmp_path / "compare"
    out.mkdir()
    (out / "scores.csv").write_text("stale\n")
    summary = compare.write_tables(tree["root"], out)
    assert {p.name for p in out.iterdir()} == OUT_FILES  # no temporary files left
    assert read_csv(out / "scores.csv") == as_cells(compare.scores_table(tree["root"]))
    assert read_csv(out / "sizes.csv") == as_cells(compare.sizes_table(tree["root"]))
    assert read_csv(out / "layers.csv") == as_cells(compare.layers_table(tree["root"]))
    assert read_csv(out / "matching.csv") == as_cells(matching)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["rows"] == {
        name: len(read_csv(out / f"{name}.csv"))
        for name in ("scores", "sizes", "layers", "matching", "features")
    }
    assert summary["profiles"] == sorted([*SAME_MODEL, "other-model"])
    assert sorted(map(tuple, summary["pairs"])) == sorted(
        (a, b) for a in SAME_MODEL for b in SAME_MODEL if a != b
    )
    assert set(summary["skipped"]) == {"off", "empty"}
    assert summary["skipped"]["off"] == "disabled"
    assert "graph" in summary["skipped"]["empty"]
    for name in ("scores", "layers"):
        assert not {"off", "empty"} & {r["profile"] for r in read_csv(out / f"{name}.csv")}


def test_write_tables_failures_leave_old_files_and_no_temporary_files(tree, tmp_path, monkeypatch):
    out = tmp_path / "compare"
    out.mkdir()
    for name in OUT_FILES:
        (out / name).write_text(f"old {name}\n")

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(compare, "compare_pairs", fail)  # the last tables computed
    with pytest.raises(RuntimeError, match="injected"):
        compare.write_tables(tree["root"], out)
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: f"old {n}\n" for n in OUT_FILES}
    monkeypatch.undo()

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)  # mid-file: header already written
    with pytest.raises(RuntimeError, match="injected"):
        compare.write_tables(tree["root"], out)
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: f"old {n}\n" for n in OUT_FILES}


def test_find_profiles_fails_loudly_on_a_folder_that_is_not_a_profile(tree, tmp_path):
    root = Path(shutil.copytree(tree["root"], tmp_path / "outputs"))
    (root / "profiles" / "stray").mkdir()
    with pytest.raises(FileNotFoundError, match="stray"):
        compare.find_profiles(root)
    with pytest.raises(FileNotFoundError, match="profiles"):
        compare.find_profiles(tmp_path / "nowhere")


def test_pipeline_script_writes_outputs_compare(tree, tmp_path, monkeypatch, capsys):
    shutil.copytree(tree["root"], tmp_path / "outputs")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(PIPELINES / "compare.py"), run_name="__main__")
    assert {p.name for p in (tmp_path / "outputs" / "compare").iterdir()} == OUT_FILES
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "outputs/compare/summary.json").read_text())


def test_features_table_maps_kept_nodes_through_the_matching_with_labels(tree):
    """A permuted copy of a set: every kept node of A has its permuted image, cosine 1, kept in B;
    the labels are the callables' answers for each side's own feature index."""
    perm_labels = {"a": lambda layer, f: f"a{layer}:{f}", "perm": lambda layer, f: f"p{layer}:{f}"}
    _, rows = compare.compare_pairs(tree["root"], labels=perm_labels)
    rows = [r for r in rows if (r["profile_a"], r["profile_b"]) == ("a", "perm")]
    ts_a, ts_p = load_transcoders(tree["sets"] / "a"), load_transcoders(tree["sets"] / "perm")
    for prompt in PROMPTS:
        expected = kept_nodes(graph_of(tree, "a", prompt))
        found = [r for r in rows if r["prompt"] == prompt]
        assert len(found) == len(expected)
    assert rows
    for row in rows:
        assert tuple(row) == compare.FEATURE_COLUMNS
        layer, a, b = row["layer"], row["feature_a"], row["feature_b"]
        assert torch.equal(ts_a.decoder(layer, layer)[a], ts_p.decoder(layer, layer)[b])
        assert row["cosine"] == pytest.approx(1.0, abs=1e-6) and row["kept_in_b"]
        assert (row["label_a"], row["label_b"]) == (f"a{layer}:{a}", f"p{layer}:{b}")
