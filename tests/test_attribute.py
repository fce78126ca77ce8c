"""attribute() options beyond exactness: dtypes, offloading, metadata, subgraph scores."""

import pytest
import torch

from tracer.attribution.attribute import attribute
from tracer.graph.summary import prune_graph
from tracer.model.replacement import ReplacementModel
from tracer.testing import build_model, build_transcoders
from tracer.transcoders.files import load_transcoders, save_transcoders

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def test_bfloat16_graph_close_to_float32():
    """bfloat16 runs end to end; its adjacency is the float32 one up to bfloat16 rounding."""
    targets = [20, 33, 40]
    model = build_model("llama")
    ts = build_transcoders("plt-relu", n_layers=2, d_model=32)
    g32 = attribute(PROMPT, ReplacementModel(model, ts), targets=targets, progress=False)
    model16 = build_model("llama").to(torch.bfloat16)
    ts16 = build_transcoders("plt-relu", n_layers=2, d_model=32)
    g16 = attribute(PROMPT, ReplacementModel(model16, ts16), targets=targets, progress=False)
    assert g16.metadata["dtype"] == "bfloat16"
    assert g16.adjacency_matrix.dtype == torch.float32
    # the same logit rows, agreeing to a few bfloat16 roundings of the largest entry
    rows16 = g16.adjacency_matrix[-3:]
    rows32 = g32.adjacency_matrix[-3:]
    # compare error and token columns (feature sets can differ where activations are near zero)
    cols16 = slice(g16.layout.n_features, g16.layout.n_nodes - len(g16.logit_targets))
    cols32 = slice(g32.layout.n_features, g32.layout.n_nodes - len(g32.logit_targets))
    scale = rows32[:, cols32].abs().max()
    assert (rows16[:, cols16] - rows32[:, cols32]).abs().max() <= 0.05 * scale


def test_offload_drops_transcoder_weights_and_gives_the_same_graph(tmp_path):
    model = build_model("gpt2")
    save_transcoders(build_transcoders("clt", n_layers=2, d_model=32), tmp_path / "clt")
    resident = attribute(
        PROMPT, ReplacementModel(model, load_transcoders(tmp_path / "clt")), progress=False
    )
    ts = load_transcoders(tmp_path / "clt")
    offloaded = attribute(PROMPT, ReplacementModel(model, ts), offload=True, progress=False)
    assert not ts._layers  # nothing left in memory after attribution
    assert torch.equal(resident.adjacency_matrix, offloaded.adjacency_matrix)


def test_metadata_records_phases_and_backward_passes():
    rm = ReplacementModel(
        build_model("gpt2"), build_transcoders("plt-relu", n_layers=2, d_model=32)
    )
    graph = attribute(PROMPT, rm, batch_size=10, progress=False)
    meta = graph.metadata
    assert set(meta["timings"]) == {"forward", "linear_forward", "rows"}
    n_logits, n_features = len(graph.logit_targets), graph.layout.n_features
    assert meta["n_backward"] == -(-n_features // 10) + -(-n_logits // 10)
    assert meta["config"]["batch_size"] == 10 and meta["family"] == "gpt2"


def test_subgraph_scores():
    rm = ReplacementModel(build_model("gpt2"), build_transcoders("clt", n_layers=2, d_model=32))
    graph = attribute(PROMPT, rm, progress=False)
    layout = graph.layout
    # pinning every feature and error node keeps the whole graph
    full = graph.scores()
    every = graph.subgraph_scores(list(range(layout.n_features + layout.n_errors)))
    assert abs(every.replacement - full.replacement) < 1e-6
    assert abs(every.completeness - full.completeness) < 1e-6
    # merging the error nodes into "error" does not change where influence ends up
    features = graph.subgraph_scores(list(range(layout.n_features)))
    assert abs(features.replacement - full.replacement) < 1e-6
    # pinning nothing leaves only token -> logit edges: replacement = their normalised weight
    none = graph.subgraph_scores([])
    a = graph.adjacency_matrix.double().abs()
    b = a / a.sum(1, keepdim=True).clamp_min(1e-300)  # |A| rows normalised to sum 1
    w = graph.logit_probabilities.double()
    direct = (w[:, None] * b[layout.logit_slice, layout.token_slice]).sum() / w.sum()
    assert abs(none.replacement - direct.item()) < 1e-6


def test_to_json_is_the_pruned_graph():
    rm = ReplacementModel(
        build_model("gpt2"), build_transcoders("plt-relu", n_layers=2, d_model=32)
    )
    graph = attribute(PROMPT, rm, progress=False)
    document = prune_graph(graph, 0.5, 0.9).document
    result = graph.prune(0.5, 0.9)
    assert len(document["nodes"]) == int(result.node_mask.sum()) < graph.layout.n_nodes
    assert document["metadata"]["node_threshold"] == 0.5


def _half_bound(dtype: torch.dtype, reference: torch.Tensor) -> torch.Tensor:
    """Rounding once to `dtype`: half a unit in the last place, relative, or absolute for
    float16's subnormals (below 2^-14)."""
    u = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    return u * reference.abs() + (2.0**-25 if dtype == torch.float16 else 0.0)


def test_half_precision_adjacency_is_the_float32_one_rounded_once(tmp_path):
    rm = ReplacementModel(build_model("llama"), build_transcoders("clt", n_layers=2, d_model=32))
    full = attribute(PROMPT, rm, progress=False)
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        graph = attribute(PROMPT, rm, adjacency_dtype=name, progress=False)
        assert graph.adjacency_matrix.dtype == dtype
        assert graph.metadata["config"]["adjacency_dtype"] == name
        assert torch.equal(graph.selected_features, full.selected_features)
        stored, exact = graph.adjacency_matrix.float(), full.adjacency_matrix
        assert bool(((stored - exact).abs() <= _half_bound(dtype, exact)).all())
        assert bool((stored != 0).sum() > 0.9 * (exact != 0).sum())
        # the graph works downstream: file round trip, pruning and scores near the float32 ones
        back = type(graph).load(graph.save(tmp_path / f"{name}.safetensors"))
        assert torch.equal(
            back.adjacency_matrix.view(torch.int16), graph.adjacency_matrix.view(torch.int16)
        )
        assert abs(back.scores().replacement - full.scores().replacement) < 0.01
        assert (
            abs(back.scores(back.prune()).completeness - full.scores(full.prune()).completeness)
            < 0.05
        )


def test_half_precision_with_a_node_budget():
    rm = ReplacementModel(
        build_model("gpt2"), build_transcoders("plt-relu", n_layers=2, d_model=32)
    )
    full = attribute(PROMPT, rm, max_feature_nodes=10, progress=False)
    half = attribute(PROMPT, rm, max_feature_nodes=10, adjacency_dtype="bfloat16", progress=False)
    assert half.adjacency_matrix.dtype == torch.bfloat16 and half.layout.n_features == 10
    # rounding once does not change which features the greedy exploration picks here
    assert torch.equal(half.selected_features, full.selected_features)
    exact = full.adjacency_matrix
    bound = _half_bound(torch.bfloat16, exact)
    assert bool(((half.adjacency_matrix.float() - exact).abs() <= bound).all())


def test_unknown_adjacency_dtype_is_refused():
    rm = ReplacementModel(
        build_model("gpt2"), build_transcoders("plt-relu", n_layers=2, d_model=32)
    )
    with pytest.raises(
        ValueError, match="adjacency_dtype must be one of float32, float16, bfloat16"
    ):
        attribute(PROMPT, rm, adjacency_dtype="int8", progress=False)
