"""The Interventions page's logic: load a profile's model, turn picked nodes into interventions,
run them and set the measured change of each graph logit beside the graph's prediction.

No Streamlit here. A ReplacementModel may serve several sessions at once (each call builds its own
prompt state; the model's traced passes take turns), so nothing here changes the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from dashboards import catalog
from dashboards.catalog import REPRO, MissingOutputs
from dashboards.documents import node_kind as document_node_kind
from tracer.experiments import outputs as paths
from tracer.experiments.fetched import load_model
from tracer.graph.graph import Graph, LogitTarget
from tracer.graph.viewer import node_ids as graph_node_ids
from tracer.hub import is_hf_uri, looks_local
from tracer.interventions.intervene import (
    Change,
    ErrorChange,
    FeatureChange,
    TokenChange,
    generate,
    run_with_changes,
)
from tracer.interventions.modes import MODES
from tracer.interventions.prediction import node_kind, predict_change, relative_changes
from tracer.interventions.validation import demeaned_logits
from tracer.model.replacement import ReplacementModel

ACTIONS = ("ablate", "scale", "set")
ID_FORMS = "ids look like 3_517_4 for features, 3_-1_4 for errors, E_262_0 for tokens"
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
_ID = {
    "feature": re.compile(r"^(\d+)_(\d+)_(\d+)$"),
    "error": re.compile(r"^(\d+)_-1_(\d+)$"),
    "token": re.compile(r"^E_(\d+)_(\d+)$"),
}


# ---- the model ----------------------------------------------------------------------------------
def _local_path(project: Path, path: str) -> str:
    """A model or transcoder reference of profile.json as the pipeline means it: relative local
    paths start at the project folder; hub ids and hf:// URIs stay."""
    if is_hf_uri(path) or Path(path).expanduser().is_absolute():
        return path
    if (project / path).exists() or looks_local(path):
        return str(project / path)
    return path  # a hub repo id


def _fetched_folder(project: Path, path: str) -> str:
    """A folder a fetch record names (always local): relative ones start at the project folder."""
    folder = Path(path).expanduser()
    return str(folder if folder.is_absolute() else project / folder)


def _fetched_path(root: Path, profile: str) -> Path:
    return paths.fetched_dir(root, profile) / paths.FETCHED_FILE


def load_key(root: Path, profile: str, info: dict) -> str:
    """sha256 of what says where the model comes from (the fetch record, else profile.json):
    a cached model is loaded again when it changes."""
    record = _fetched_path(root, profile)
    content = record.read_bytes() if record.is_file() else json.dumps(info, sort_keys=True).encode()
    return hashlib.sha256(content).hexdigest()


def load_replacement(
    root: Path, profile: str, info: dict, project: Path | None = None
) -> ReplacementModel:
    """The profile's replacement model: from the fetch stage's record when there is one, else
    from profile.json's model and transcoders; MissingOutputs saying what is missing and what to
    run. Relative paths start at `project`, by default the folder holding the outputs folder (for
    runs opened from MLflow, whose folder is a download, the app passes the repository's)."""
    root = Path(root)
    project = catalog.project_folder(root) if project is None else Path(project)
    record_path = _fetched_path(root, profile)
    fetch = f"{REPRO} (stage `fetch@{profile}`)"
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            if record.get("enabled") is False:
                raise MissingOutputs(
                    f"`{record_path}` says {profile} is disabled: set `profiles.{profile}.enabled:"
                    f" true` in params.yaml and run {fetch}."
                )
            record = record | {
                part: record[part] | {"path": _fetched_folder(project, record[part]["path"])}
                for part in ("model", "transcoders")
            }
            return load_model(record)
        except (*_LOAD_ERRORS, json.JSONDecodeError) as err:
            raise MissingOutputs(
                f"Cannot load the model of {profile} from the fetch record `{record_path}`: "
                f"{err}. Run {fetch} (or `dvc pull` for a cached run) to fetch it again."
            ) from err
    missing = [key for key in ("model", "transcoders") if not info.get(key)]
    if missing:
        raise MissingOutputs(
            f"No fetch record `{record_path}` and profile.json of {profile} names no {missing}: "
            f"run {fetch}."
        )
    try:
        return ReplacementModel.from_pretrained(
            _local_path(project, info["model"]),
            _local_path(project, info["transcoders"]),
            dtype=info.get("dtype") or "float32",
            revision=info.get("revision"),
            transcoder_revision=info.get("transcoder_revision"),
        )
    except _LOAD_ERRORS as err:
        raise MissingOutputs(
            f"Cannot load the model of {profile}: no fetch record `{record_path}`, and profile.json"
            f"'s model {info['model']!r} with transcoders {info['transcoders']!r} did not load "
            f"({err}). Run {fetch} to fetch them."
        ) from err


# ---- nodes -> interventions ---------------------------------------------------------------------
def node_kinds(graph_or_document: Graph | dict) -> dict[str, str]:
    """node id -> feature | error | token | logit, of a full graph or a pruned document."""
    if isinstance(graph_or_document, Graph):
        ids = graph_node_ids(graph_or_document)
        return {node: node_kind(graph_or_document, i) for i, node in enumerate(ids)}
    return {n["node_id"]: document_node_kind(n) for n in graph_or_document["nodes"]}


def changes_for(
    node_ids: Sequence[str], action: str, amount: float, graph_or_document: Graph | dict
) -> list[Change]:
    """The engine's changes of `action` on each node: "ablate" (features set to 0, errors and
    tokens scaled by 0), "scale" (by `amount`) or "set" (features only, to `amount`)."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if action != "ablate" and not math.isfinite(amount):
        raise ValueError(f"the amount to {action} by must be a finite number, got {amount}")
    if not node_ids:
        raise ValueError("no nodes picked: pick at least one feature, error or token node")
    kinds = node_kinds(graph_or_document)
    changes: list[Change] = []
    for node in node_ids:
        kind = kinds.get(node)
        if kind is None:
            raise ValueError(f"{node!r} is not a node of this graph ({ID_FORMS})")
        if kind == "logit":
            raise ValueError(
                f"{node!r} is a logit node: logits are what an intervention is measured on, "
                "pick feature, error or token nodes"
            )
        match = _ID[kind].match(node)
        if match is None:
            raise ValueError(f"{node!r} is not a well-formed {kind} node id ({ID_FORMS})")
        numbers = [int(g) for g in match.groups()]
        if kind == "feature":
            layer, feature, pos = numbers
            if action == "scale":
                changes.append(FeatureChange(layer, pos, feature, scale=amount))
            else:
                value = 0.0 if action == "ablate" else amount
                changes.append(FeatureChange(layer, pos, feature, value=value))
            continue
        if action == "set":
            raise ValueError(
                f"{node!r} is {'an' if kind == 'error' else 'a'} {kind} node: set is for features "
                "only; ablate or scale it instead"
            )
        scale = 0.0 if action == "ablate" else amount
        if kind == "error":
            changes.append(ErrorChange(numbers[0], numbers[1], scale))
        else:
            changes.append(TokenChange(numbers[1], scale))
    return changes


# ---- running ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InterventionOutcome:
    """What one intervention did, as tables: rows are plain dicts (a DataFrame each)."""

    changes: tuple[Change, ...]
    mode: str
    top_before: list[dict]  # rank, token, token_id, probability (clean), probability_after
    top_after: list[dict]  # rank, token, token_id, probability (after), probability_before
    logits: list[dict]  # per graph logit: label, clean, measured, predicted_direct, predicted_total
    measured: torch.Tensor  # (k,) change of each graph logit's demeaned value
    predicted: bool  # whether the graph's predictions are in `logits` (the full graph was given)
    text_before: str
    text_after: str


def logit_targets(graph_or_document: Graph | dict, model: ReplacementModel) -> list[LogitTarget]:
    """The graph's logit targets; from a pruned document, its single-token logit nodes."""
    if isinstance(graph_or_document, Graph):
        return list(graph_or_document.logit_targets)
    targets = []
    for node in graph_or_document["nodes"]:
        if document_node_kind(node) != "logit":
            continue
        token = int(node["node_id"].split("_")[1])
        if token < model.vocab_size:  # else a target that is not one token: not in the document
            label = _token_text(model, token)
            targets.append(LogitTarget.token(token, float(node.get("token_prob") or 0.0), label))
    return targets


def _token_text(model: ReplacementModel, token: int) -> str:
    return model.tokenizer.decode([token]) if model.tokenizer is not None else str(token)


def _top_rows(
    model: ReplacementModel, logits: torch.Tensor, other: torch.Tensor, k: int, name: str
) -> list[dict]:
    """logits (vocab,) -> the k most probable next tokens, with each one's probability under
    `other` (vocab,) logits in the column `name`."""
    probabilities = torch.softmax(logits.float(), -1)
    others = torch.softmax(other.float(), -1)
    top, tokens = probabilities.topk(min(k, logits.shape[-1]))
    return [
        {
            "rank": i + 1,
            "token": _token_text(model, t),
            "token_id": t,
            "probability": p,
            name: float(others[t]),
        }
        for i, (p, t) in enumerate(zip(top.tolist(), tokens.tolist(), strict=True))
    ]


def _prompt_ids(
    model: ReplacementModel, prompt_text: str | torch.Tensor, graph_or_document
) -> torch.Tensor:
    """The prompt's token ids (text, or the graph's own ids), checked against the graph's."""
    ids = model.tokenize(prompt_text)
    if isinstance(graph_or_document, Graph):
        expected = graph_or_document.input_tokens.tolist()
        if ids.tolist() != expected:
            raise ValueError(
                f"the prompt {prompt_text!r} tokenizes to {ids.tolist()} but the graph was "
                f"computed from {expected}: this model is not the graph's"
            )
    else:
        tokens = graph_or_document.get("metadata", {}).get("prompt_tokens")
        if tokens and len(tokens) != ids.shape[0]:
            raise ValueError(
                f"the prompt {prompt_text!r} has {ids.shape[0]} tokens under this model but the "
                f"graph has {len(tokens)}: this model is not the graph's"
            )
    return ids


def run_intervention(
    model: ReplacementModel,
    prompt_text: str | torch.Tensor,
    graph: Graph | dict,
    node_ids: Sequence[str],
    action: str,
    amount: float,
    mode: str,
    max_new_tokens: int = 8,
    k: int = 10,
) -> InterventionOutcome:
    """Intervene on `node_ids` of `graph` (a full Graph, or a pruned document: then without the
    graph's predictions) in `mode`: the next-token top k before and after, the measured change
    of each graph logit's demeaned value (against an unchanged row of the same batch) beside the
    predicted one (direct, and total: "direct" mode matches the first, the others the second),
    and greedy generations before and after with the intervention held on the prompt."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(graph, Graph) and graph.n_layers != model.n_layers:
        raise ValueError(f"the graph has {graph.n_layers} layers but the model {model.n_layers}")
    changes = changes_for(node_ids, action, amount, graph)
    ids = _prompt_ids(model, prompt_text, graph)
    targets = logit_targets(graph, model)
    state = model.run_prompt(ids, zero_bos=False)
    batch = [[], changes]  # row 0 unchanged: the baseline of row 1 in this mode
    result = run_with_changes(
        model, state, ids[None].expand(2, -1), batch, mode, with_activations=False
    )
    last = result.logits[:, -1]  # (2, vocab)
    clean = demeaned_logits(model, state.logits[-1:], targets)[0]  # (k,)
    values = demeaned_logits(model, last, targets)
    measured = values[1] - values[0]
    direct = total = None
    if isinstance(graph, Graph):
        prediction = predict_change(graph, relative_changes(graph, changes))
        direct, total = prediction.direct, prediction.total
    rows = []
    for i, target in enumerate(targets):
        rows.append(
            {
                "target": target.label,
                "token_ids": list(target.token_ids),
                "clean": float(clean[i]),
                "measured": float(measured[i]),
                "predicted_direct": None if direct is None else float(direct[i]),
                "predicted_total": None if total is None else float(total[i]),
            }
        )
    texts = generate(model, ids, batch, max_new_tokens=max_new_tokens, mode=mode).texts
    before, after = texts if texts is not None else ("", "")
    return InterventionOutcome(
        changes=tuple(changes),
        mode=mode,
        top_before=_top_rows(model, state.logits[-1], last[1], k, "probability_after"),
        top_after=_top_rows(model, last[1], state.logits[-1], k, "probability_before"),
        logits=rows,
        measured=measured,
        predicted=direct is not None,
        text_before=before,
        text_after=after,
    )
