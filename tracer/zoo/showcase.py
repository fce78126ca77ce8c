"""The zoo's two-hop showcase: city -> state -> capital in a graph, and a state swap that moves it.

For a held-out prompt "the capital of the state containing CITY is", the *state features* are the
transcoder features, at the city's position or after it, whose activation singles out the city's
state: mean activation over prompts with a city of that state, minus the mean over all other
cities' prompts, both measured on the same template. The showcase then
1. attributes the prompt, prunes the graph, and reports where the state features sit in it
   (kept or not, their influence on the logits);
2. intervenes (full mode): the state's features set to 0, another state's features set to their
   activations on a prompt about one of its cities, and reports the new top answer.
Nothing is fitted to make the demo work: whatever the model does is what the report says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracer.attribution.attribute import attribute
from tracer.interventions.intervene import FeatureChange, intervene
from tracer.model.replacement import ReplacementModel
from tracer.zoo.corpus import STATE_OF, STATES

TEMPLATE = "the capital of the state containing {city} is"


def capital_of(state: str) -> str:
    return STATES[state][0]


@dataclass
class StateFeatures:
    position: int  # the city's token position (with the start token)
    # state -> [(pos, layer, feature, selectivity)]
    features: dict[str, list[tuple[int, int, int, float]]]
    activations: dict[str, torch.Tensor]  # city -> (n_pos - position, n_layers, d_transcoder)


@torch.no_grad()
def state_features(model: ReplacementModel, per_state: int = 16) -> StateFeatures:
    """The `per_state` most state-selective features at or after the city, for every state."""
    cities = sorted(STATE_OF)
    ids = {c: model.tokenize(TEMPLATE.format(city=c)) for c in cities}
    lengths = {len(v) for v in ids.values()}
    if len(lengths) != 1:
        raise ValueError("every city must be one token for the showcase template")
    position = TEMPLATE.split().index("{city}") + 1  # +1: the start token
    acts = {}
    for city in cities:
        state = model.run_prompt(ids[city], zero_bos=False)
        acts[city] = torch.stack([a[position:] for a in state.activations], dim=1).float()
    features = {}
    for state_name in sorted({STATE_OF[c] for c in cities}):
        inside = torch.stack([acts[c] for c in cities if STATE_OF[c] == state_name]).mean(0)
        outside = torch.stack([acts[c] for c in cities if STATE_OF[c] != state_name]).mean(0)
        selectivity = inside - outside  # (n_positions, n_layers, d_transcoder)
        top = selectivity.flatten().topk(per_state)
        features[state_name] = [
            (position + int(p), int(layer), int(feature), float(v))
            for v, i in zip(top.values, top.indices, strict=True)
            for p, layer, feature in [torch.unravel_index(i, selectivity.shape)]
            if v > 0
        ]
    return StateFeatures(position=position, features=features, activations=acts)


def run_showcase(
    model: ReplacementModel,
    city: str,
    other_city: str,
    *,
    per_state: int = 16,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> dict:
    """Graph + state-swap intervention for `city`, swapping in `other_city`'s state."""
    state, other = STATE_OF[city], STATE_OF[other_city]
    if state == other:
        raise ValueError(f"{city} and {other_city} are both in {state}; pick another state's city")
    prompt = TEMPLATE.format(city=city)
    found = state_features(model, per_state)
    graph = attribute(prompt, model, progress=False)
    result = graph.prune(node_threshold, edge_threshold)
    full, pruned = graph.scores(), graph.scores(result)

    selected = graph.active_features[graph.selected_features].tolist()
    index = {tuple(f): i for i, f in enumerate(selected)}
    influence = result.node_influence
    ranks = influence[: graph.layout.n_features].argsort(descending=True).argsort()
    layout = graph.layout
    city_token = layout.n_features + layout.n_errors + found.position
    answer_logits = [
        layout.n_nodes - layout.n_logits + k
        for k, t in enumerate(graph.logit_targets)
        if t.label.strip() == capital_of(state)
    ]
    placed = []
    for pos, layer, feature, selectivity in found.features[state]:
        node = index.get((layer, pos, feature))
        placed.append(
            {
                "position": pos,
                "layer": layer,
                "feature": feature,
                "selectivity": selectivity,
                "in_graph": node is not None,
                "kept_after_pruning": bool(node is not None and result.node_mask[node]),
                "influence": float(influence[node]) if node is not None else 0.0,
                "influence_rank": int(ranks[node]) if node is not None else None,
                # the path's two hops: city token -> this feature, this feature -> capital logit
                "edge_from_city_token": float(graph.adjacency_matrix[node, city_token])
                if node is not None
                else 0.0,
                "edge_to_answer_logit": float(graph.adjacency_matrix[answer_logits[0], node])
                if node is not None and answer_logits
                else 0.0,
            }
        )

    changes = [
        FeatureChange(layer, pos, feature, value=0.0)
        for pos, layer, feature, _ in found.features[state]
    ]
    changes += [
        FeatureChange(
            layer,
            pos,
            feature,
            value=float(found.activations[other_city][pos - found.position, layer, feature]),
        )
        for pos, layer, feature, _ in found.features[other]
    ]
    swapped = intervene(model, prompt, changes, mode="full")
    tokenizer = model.tokenizer
    before = tokenizer.decode([int(swapped.clean_logits[-1].argmax())])
    after = tokenizer.decode([int(swapped.logits[0, -1].argmax())])
    return {
        "prompt": prompt,
        "city": city,
        "state": state,
        "answer": capital_of(state),
        "swap_city": other_city,
        "swap_state": other,
        "swap_answer": capital_of(other),
        "scores": {
            "replacement": full.replacement,
            "completeness": full.completeness,
            "pruned_replacement": pruned.replacement,
            "pruned_completeness": pruned.completeness,
        },
        "graph": {
            "active_features": int(graph.active_features.shape[0]),
            "pruned_nodes": int(result.node_mask.sum()),
            "pruned_edges": int(result.edge_mask.sum()),
        },
        "state_features": placed,
        "intervention": {
            "top_before": before,
            "top_after": after,
            "changes_to_swap_answer": after.strip() == capital_of(other),
        },
    }
