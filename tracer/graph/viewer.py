"""Export of a *pruned* graph in the JSON format the web graph viewers read.

`{metadata, qParams, nodes, links}`, node fields as circuit-tracer's `frontend/graph_models.py`
(`Node.feature_node` / `error_node` / `token_node` / `logit_node`) computes them, and valid against
Neuronpedia's published schema (`apps/webapp/app/api/graph/graph-schema.json`):

| node    | node_id                      | jsNodeId                | feature              |
|---------|------------------------------|-------------------------|----------------------|
| feature | `{layer}_{feature}_{pos}`    | `{layer}_{feature}-0`   | cantor(layer, feature) |
| error   | `{layer}_-1_{pos}`           | `{layer}_-1-{pos}`      | -1                   |
| token   | `E_{token_id}_{pos}`         | `E_{token_id}-{pos}`    | pos                  |
| logit   | `{n_layers + 1}_{vocab_idx}_{pos}` | `L_{vocab_idx}-{pos}` | vocab_idx          |

Ids are unique: feature index -1 is never a feature's, and a logit target that is not one token
(e.g. logit(A) - logit(B)) gets upstream's virtual vocabulary index `vocab_size + k` (k its place
among the targets). A feature's jsNodeId is shared by the same feature at every position, as
upstream's is (the frontend highlights them together). Only kept nodes and kept edges are written:
a full graph never goes to a viewer.
"""

from __future__ import annotations

from collections.abc import Callable

from tracer.graph.graph import Graph, LogitTarget, library_version
from tracer.graph.pruning import PruneResult

# circuit-tracer writes this feature_type for every transcoder feature, per-layer sets included
# (it has no other string), and Neuronpedia's frontend recognises feature nodes by it alone
# (counting features for its scores, fetching feature details): another string would hide them.
FEATURE_TYPE = "cross layer transcoder"
ERROR_TYPE = "mlp reconstruction error"
TOKEN_TYPE = "embedding"
LOGIT_TYPE = "logit"


def cantor_pairing(x: int, y: int) -> int:
    """Upstream's `feature` number of a transcoder feature: a unique int for (layer, index)."""
    return (x + y) * (x + y + 1) // 2 + y


def _token_text(graph: Graph, tokenizer, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


def _is_token(target: LogitTarget) -> bool:
    return len(target.token_ids) == 1 and target.weights[0] == 1.0


def logit_vocab_index(graph: Graph, k: int) -> int:
    """The vocabulary index of logit node k: its token id, or upstream's virtual index
    `vocab_size + k` for a target that is not a single token."""
    target = graph.logit_targets[k]
    if _is_token(target):
        return target.token_ids[0]
    vocab_size = graph.metadata.get("vocab_size")
    if vocab_size is None:
        raise ValueError(
            f"logit target {target.label!r} is not a single token, and its viewer id needs the "
            "vocabulary size, which this graph's metadata lacks (graphs made before it was "
            "recorded): compute the graph again"
        )
    return int(vocab_size) + k


def node_ids(graph: Graph) -> list[str]:
    """The viewer `node_id` of every node of the full graph, in node order (see the table above)."""
    layout = graph.layout
    ids = [f"{layer}_{feature}_{pos}" for layer, pos, feature in _selected(graph)]
    ids += [f"{layer}_-1_{pos}" for layer in range(graph.n_layers) for pos in range(graph.n_pos)]
    ids += [f"E_{int(token)}_{pos}" for pos, token in enumerate(graph.input_tokens.tolist())]
    ids += [
        f"{graph.n_layers + 1}_{logit_vocab_index(graph, k)}_{graph.n_pos - 1}"
        for k in range(layout.n_logits)
    ]
    return ids


def _selected(graph: Graph) -> list[list[int]]:
    """(layer, pos, feature) of each feature node."""
    return graph.active_features[graph.selected_features].tolist()


def viewer_nodes(
    graph: Graph,
    result: PruneResult,
    tokenizer=None,
    labels: Callable[[int, int], str] | None = None,
) -> list[dict]:
    """The document's nodes; `labels(layer, feature)` gives feature nodes their `clerp`."""
    layout, n_layers = graph.layout, graph.n_layers
    influence = result.node_influence.tolist()
    selected, ids = _selected(graph), node_ids(graph)
    activations = graph.activation_values[graph.selected_features].tolist()
    kept = result.node_mask.nonzero(as_tuple=True)[0].tolist()
    nodes = []
    for index in kept:
        node = {"influence": influence[index], "activation": None, "token_prob": 0.0}
        node["is_target_logit"] = False
        if index < layout.n_features:
            layer, pos, feature = selected[index]
            node |= {
                "node_id": ids[index],
                "jsNodeId": f"{layer}_{feature}-0",
                "feature": cantor_pairing(layer, feature),
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": FEATURE_TYPE,
                "activation": activations[index],
                "clerp": labels(layer, feature) if labels is not None else "",
            }
        elif index < layout.n_features + layout.n_errors:
            layer, pos = divmod(index - layout.n_features, graph.n_pos)
            node |= {
                "node_id": ids[index],
                "jsNodeId": f"{layer}_-1-{pos}",
                "feature": -1,
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": ERROR_TYPE,
                "clerp": f"error at layer {layer}",
            }
        elif index < layout.n_nodes - layout.n_logits:
            pos = index - layout.n_features - layout.n_errors
            token = int(graph.input_tokens[pos])
            node |= {
                "node_id": ids[index],
                "jsNodeId": f"E_{token}-{pos}",
                "feature": pos,
                "layer": "E",
                "ctx_idx": pos,
                "feature_type": TOKEN_TYPE,
                "clerp": _token_text(graph, tokenizer, token),
            }
        else:
            k = index - (layout.n_nodes - layout.n_logits)
            target = graph.logit_targets[k]
            pos, vocab_index = graph.n_pos - 1, logit_vocab_index(graph, k)
            node |= {
                "node_id": ids[index],
                "jsNodeId": f"L_{vocab_index}-{pos}",
                "feature": vocab_index,
                "layer": str(n_layers + 1),
                "ctx_idx": pos,
                "feature_type": LOGIT_TYPE,
                "token_prob": target.probability,
                "is_target_logit": k == 0,
                # the label recorded with the graph (the token's text), as upstream's clerp
                "clerp": f'Output "{target.label}" (p={target.probability:.3f})',
            }
        nodes.append(node)
    return nodes


def to_viewer_json(
    graph: Graph,
    result: PruneResult,
    *,
    slug: str = "graph",
    tokenizer=None,
    labels: Callable[[int, int], str] | None = None,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
) -> dict:
    """The viewer document for a pruned graph."""
    nodes = viewer_nodes(graph, result, tokenizer, labels)
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
        "scan": str(
            graph.metadata.get("scan")
            or graph.metadata.get("transcoder_set")
            or graph.metadata.get("model_id")
            or "unknown"
        ),  # required by the schema; Neuronpedia reads it as the model id
        "prompt_tokens": tokens,
        "prompt": graph.input_string if graph.input_string is not None else "".join(tokens),
        "info": {
            "generator": {"name": "tracer", "version": library_version()},
            "model_id": graph.metadata.get("model_id"),
            "transcoder_set": graph.metadata.get("transcoder_set"),
        },
    }
    # the schema types node_threshold as a number: an unpruned document leaves the keys out
    thresholds = {"node_threshold": node_threshold, "edge_threshold": edge_threshold}
    metadata |= {key: value for key, value in thresholds.items() if value is not None}
    q_params = {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}
