"""Viewer documents of pruned graphs: re-pruning, node descriptions, links, comparisons.

A document is `{metadata, qParams, nodes, links}` as `tracer.graph.summary.prune_graph` makes it
(node fields: node_id, feature, layer, ctx_idx, feature_type, influence, activation, token_prob,
is_target_logit, clerp; links: source, target, weight). Only pruned graphs are ever turned into
documents: a full graph never reaches the browser.
"""

from __future__ import annotations

from tracer.graph.graph import Graph
from tracer.graph.summary import prune_graph

KINDS = ("token", "feature", "error", "logit")  # drawing order, bottom to top
_KIND_OF_TYPE = {"embedding": "token", "mlp reconstruction error": "error", "logit": "logit"}
SCORE_ROWS = (
    ("replacement", "replacement (full graph)"),
    ("completeness", "completeness (full graph)"),
    ("pruned_replacement", "replacement (pruned)"),
    ("pruned_completeness", "completeness (pruned)"),
    ("pruned_nodes", "nodes (pruned)"),
    ("pruned_edges", "edges (pruned)"),
    ("active_features", "active features"),
)


def node_kind(node: dict) -> str:
    """token | feature | error | logit (every transcoder `feature_type` is a feature)."""
    return _KIND_OF_TYPE.get(node.get("feature_type", ""), "feature")


class _TokenTexts:
    """Stands in for a tokenizer in `to_viewer_json`: token id -> the pipeline's token text."""

    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts

    def decode(self, ids: list[int]) -> str:
        return "".join(self.texts.get(int(i), str(int(i))) for i in ids)


def prune_document(
    graph: Graph,
    node_threshold: float,
    edge_threshold: float,
    prompt_tokens: list[str] | None = None,
    slug: str = "graph",
) -> tuple[dict, dict]:
    """Prune `graph` and return (viewer document, pruned scores and sizes).

    `prompt_tokens` (the pipeline document's `metadata.prompt_tokens`) label the token nodes; the
    graph file holds token ids only. Scores: the `pruned_*` entries of scores.json.
    """
    tokenizer = None
    if prompt_tokens is not None and len(prompt_tokens) == graph.n_pos:
        ids = graph.input_tokens.tolist()
        tokenizer = _TokenTexts(dict(zip(ids, prompt_tokens, strict=True)))
    pruned = prune_graph(
        graph, node_threshold, edge_threshold, slug=slug, tokenizer=tokenizer, full_scores=False
    )
    return pruned.document, pruned.scores


def prompt_tokens(document: dict) -> list[str]:
    """The prompt's tokens as text (position i is `ctx_idx` i)."""
    tokens = document.get("metadata", {}).get("prompt_tokens")
    if tokens:
        return [str(t) for t in tokens]
    n_pos = 1 + max((int(n["ctx_idx"]) for n in document["nodes"]), default=0)
    return [str(i) for i in range(n_pos)]


def feature_index(node: dict) -> int:
    """A feature node's index in its layer's transcoder, from its id `{layer}_{feature}_{pos}`
    (the node's `feature` field is the viewer's Cantor pairing of layer and index)."""
    return int(node["node_id"].split("_")[1])


def describe_node(node: dict, tokens: list[str]) -> str:
    """One line naming a node: what it is, where (layer, position and its token)."""
    pos = int(node["ctx_idx"])
    where = f"pos {pos} {tokens[pos]!r}" if pos < len(tokens) else f"pos {pos}"
    kind = node_kind(node)
    if kind == "feature":
        return f"feature L{node['layer']} #{feature_index(node)} @ {where}"
    if kind == "error":
        return f"error L{node['layer']} @ {where}"
    if kind == "token":
        return f"token @ {where}"
    return node.get("clerp") or f"logit {node['feature']}"


def node_label(node: dict) -> str:
    """What a node is labelled with: its feature label (`features.with_labels`), else the
    document's `clerp` (the prune stage's label; `Output "TOKEN" (p=...)` for logits)."""
    return node.get("label") or node.get("clerp") or ""


def node_table(document: dict) -> list[dict]:
    """Every node with its description, sorted by influence (logits by probability) descending."""
    tokens = prompt_tokens(document)
    rows = [
        {
            "node_id": n["node_id"],
            "kind": node_kind(n),
            "description": describe_node(n, tokens),
            "label": node_label(n),
            "layer": n["layer"],
            "ctx_idx": n["ctx_idx"],
            "feature": n.get("feature"),
            "activation": n.get("activation"),
            "influence": n.get("influence"),
            "token_prob": n.get("token_prob"),
        }
        for n in document["nodes"]
    ]
    return sorted(rows, key=lambda r: -(r["influence"] or 0) - (r["token_prob"] or 0))


def strongest_links(document: dict, node_id: str, k: int = 10) -> tuple[list[dict], list[dict]]:
    """(incoming, outgoing) links of a node, the k largest by |weight| each, largest first.

    Rows: `node_id` (the other end), `description`, `label`, `weight` (direct effect, target's
    units).
    """
    tokens = prompt_tokens(document)
    by_id = {n["node_id"]: n for n in document["nodes"]}

    def rows(pairs: list[tuple[str, float]]) -> list[dict]:
        pairs = sorted(pairs, key=lambda p: -abs(p[1]))[:k]
        return [
            {
                "node_id": other,
                "description": describe_node(by_id[other], tokens),
                "label": node_label(by_id[other]),
                "weight": w,
            }
            for other, w in pairs
        ]

    links = document["links"]
    incoming = [(lk["source"], lk["weight"]) for lk in links if lk["target"] == node_id]
    outgoing = [(lk["target"], lk["weight"]) for lk in links if lk["source"] == node_id]
    return rows(incoming), rows(outgoing)


# ---- comparing two documents --------------------------------------------------------------------
def shared_nodes(document_a: dict, document_b: dict) -> list[dict]:
    """Per kind (and `all`): node ids in A, in B, in both, only in one, and Jaccard (None if 0/0).

    Ids name the same node only for the same model and prompt tokens; feature ids name the same
    feature only for the same transcoder set.
    """
    rows = []
    for kind in (*KINDS, "all"):
        a, b = (
            {n["node_id"] for n in doc["nodes"] if kind == "all" or node_kind(n) == kind}
            for doc in (document_a, document_b)
        )
        union = len(a | b)
        rows.append(
            {
                "kind": kind,
                "a": len(a),
                "b": len(b),
                "shared": len(a & b),
                "only_a": len(a - b),
                "only_b": len(b - a),
                "jaccard": len(a & b) / union if union else None,
            }
        )
    return rows


def score_deltas(scores_a: dict, scores_b: dict) -> list[dict]:
    """Rows of (label, A, B, B - A) for the scores and sizes both scores.json files hold."""
    rows = []
    for key, label in SCORE_ROWS:
        a, b = scores_a.get(key), scores_b.get(key)
        if a is None or b is None:
            continue
        rows.append({"metric": label, "key": key, "a": a, "b": b, "b_minus_a": b - a})
    return rows
