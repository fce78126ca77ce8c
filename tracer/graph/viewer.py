"""Export of a *pruned* graph in the JSON format the web graph viewers read.

`{metadata, qParams, nodes, links}`; node ids: features `"{layer}_{feature}_{pos}"`, errors
`"0_{layer}_{pos}"`, tokens `"E_{token_id}_{pos}"`, logits `"{n_layers + 1}_{token_id}_{pos}"`.
Only kept nodes and kept edges are written: a full graph never goes to a viewer.

The scheme is not collision-free: the error id `0_{layer}_{pos}` equals the id of layer-0 feature
number `layer` at the same position, and a direction target (logit(A) - logit(B)) shares its id
with a plain target A. A node whose id was already taken gets `~{n}` appended, so links stay
unambiguous; ids of the scheme are otherwise kept exactly.
"""

from __future__ import annotations

from tracer.graph.graph import Graph, library_version
from tracer.graph.pruning import PruneResult


def _token_text(graph: Graph, tokenizer, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


def viewer_nodes(graph: Graph, result: PruneResult, tokenizer=None) -> list[dict]:
    layout, n_layers = graph.layout, graph.n_layers
    influence = result.node_influence.tolist()
    selected = graph.active_features[graph.selected_features].tolist()
    activations = graph.activation_values[graph.selected_features].tolist()
    kept = result.node_mask.nonzero(as_tuple=True)[0].tolist()
    nodes = []
    for index in kept:
        node = {"influence": influence[index], "activation": None, "token_prob": 0.0}
        node["is_target_logit"] = False
        if index < layout.n_features:
            layer, pos, feature = selected[index]
            node |= {
                "node_id": f"{layer}_{feature}_{pos}",
                "feature": feature,
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "cross layer transcoder",
                "activation": activations[index],
                "clerp": "",
            }
        elif index < layout.n_features + layout.n_errors:
            layer, pos = divmod(index - layout.n_features, graph.n_pos)
            node |= {
                "node_id": f"0_{layer}_{pos}",
                "feature": None,
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "mlp reconstruction error",
                "clerp": f"error at layer {layer}",
            }
        elif index < layout.n_nodes - layout.n_logits:
            pos = index - layout.n_features - layout.n_errors
            token = int(graph.input_tokens[pos])
            node |= {
                "node_id": f"E_{token}_{pos}",
                "feature": pos,
                "layer": "E",
                "ctx_idx": pos,
                "feature_type": "embedding",
                "clerp": _token_text(graph, tokenizer, token),
            }
        else:
            k = index - (layout.n_nodes - layout.n_logits)
            target = graph.logit_targets[k]
            pos = graph.n_pos - 1
            node |= {
                "node_id": f"{n_layers + 1}_{target.token_ids[0]}_{pos}",
                "feature": target.token_ids[0],
                "layer": str(n_layers + 1),
                "ctx_idx": pos,
                "feature_type": "logit",
                "token_prob": target.probability,
                "is_target_logit": k == 0,
                "clerp": f'output "{target.label}" (p={target.probability:.3f})',
            }
        nodes.append(node)
    taken: dict[str, int] = {}
    for node in nodes:
        base = node["node_id"]
        count = taken.get(base, 0)
        taken[base] = count + 1
        if count:
            node["node_id"] = f"{base}~{count}"
        node["jsNodeId"] = node["node_id"]
    return nodes


def to_viewer_json(
    graph: Graph,
    result: PruneResult,
    *,
    slug: str = "graph",
    tokenizer=None,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
) -> dict:
    """The viewer document for a pruned graph."""
    nodes = viewer_nodes(graph, result, tokenizer)
    ids = {
        index: node["node_id"]
        for index, node in zip(
            result.node_mask.nonzero(as_tuple=True)[0].tolist(), nodes, strict=True
        )
    }
    targets, sources = result.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency_matrix[targets, sources].tolist()
    links = [
        {"source": ids[s], "target": ids[t], "weight": w}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
        if s in ids and t in ids and w != 0
    ]
    tokens = [_token_text(graph, tokenizer, int(t)) for t in graph.input_tokens]
    metadata = {
        "slug": slug,
        "scan": graph.metadata.get("scan") or graph.metadata.get("transcoder_set"),
        "prompt_tokens": tokens,
        "prompt": graph.input_string if graph.input_string is not None else "".join(tokens),
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "info": {
            "generator": {"name": "tracer", "version": library_version()},
            "model_id": graph.metadata.get("model_id"),
            "transcoder_set": graph.metadata.get("transcoder_set"),
        },
    }
    q_params = {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}
