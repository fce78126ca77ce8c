"""The pipeline's results as tracking reads them: one record per (profile, prompt), and provenance.

No mlflow here: `tracking` (the MLflow adapter) turns these records into runs. A record's run key is
a sha256 of the profile, the prompt id, the scores.json bytes, the graph file's sha256 and the
validation JSON's bytes (timings are not part of it): the same results give the same key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tracer.experiments import outputs
from tracer.graph.storage import read_header

PROFILE_FIELDS = ("model", "revision", "transcoders", "transcoder_revision", "dtype")
SCORE_METRICS = (
    "replacement",
    "completeness",
    "pruned_replacement",
    "pruned_completeness",
    "nodes",
    "edges",
    "pruned_nodes",
    "pruned_edges",
    "active_features",
    "selected_features",
)
ARTIFACTS = (outputs.PRUNED_FILE, outputs.SCORES_FILE)


# ---- provenance --------------------------------------------------------------------------------
def dvc_stage_tags(dvc_lock: str | Path, profile: str, profile_dir: str | Path) -> dict[str, str]:
    """Tags naming the dvc.lock stages that belong to `profile` and a hash of their deps/outs.

    A stage belongs to the profile when its foreach key (after `@`) is the profile name or one of
    its outs lies inside `profile_dir`; dvc.lock paths are relative to the lock file's folder."""
    lock_path = Path(dvc_lock)
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages") or {}
    try:
        inside = Path(profile_dir).resolve().relative_to(lock_path.parent.resolve()).as_posix()
    except ValueError:
        inside = None
    lines: list[str] = []
    names: list[str] = []
    for name, stage in sorted(stages.items()):
        entries = [*(stage.get("deps") or []), *(stage.get("outs") or [])]
        outs = [entry["path"] for entry in stage.get("outs") or []]
        owns = inside is not None and any(p == inside or p.startswith(f"{inside}/") for p in outs)
        if name.partition("@")[2] != profile and not owns:
            continue
        names.append(name)
        lines += sorted(f"{name} {e['path']} {e.get('md5', '')}" for e in entries)
    if not names:
        return {}
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"tracer.dvc.stages": ",".join(names), "tracer.dvc.hash": digest}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_key(
    profile: str, prompt_id: str, scores_json: bytes, graph_sha256: str, validation: bytes = b""
) -> str:
    """The identity of one logged result: same key, same numbers and same graph file."""
    parts = [profile, prompt_id, hashlib.sha256(scores_json).hexdigest(), graph_sha256]
    if validation:
        parts.append(hashlib.sha256(validation).hexdigest())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# ---- reading the pipeline's files --------------------------------------------------------------
@dataclass(frozen=True)
class PromptResult:
    """One (profile, prompt) directory of the prune stage, read and checked."""

    profile: str
    prompt_id: str
    directory: Path
    profile_info: dict
    scores: dict
    graph_path: Path
    graph_header: dict  # the tracer header of the graph file
    run_key: str
    timings: dict  # {"seconds": {phase: s}, "attribution_peak_growth_bytes": n}, or {}
    validation: Path | None  # the validate stage's JSON, when it ran

    @property
    def name(self) -> str:
        return f"{self.profile}/{self.prompt_id}"


def find_results(root: str | Path) -> tuple[list[PromptResult], list[str]]:
    """Every (profile, prompt) result under `root/profiles`, and the names of disabled profiles.

    A prompt directory is a subdirectory of a profile holding a scores.json."""
    profiles = Path(root) / "profiles"
    if not profiles.is_dir():
        raise FileNotFoundError(f"{profiles} does not exist; the pipeline's graph stages write it")
    results: list[PromptResult] = []
    disabled: list[str] = []
    for profile in outputs.profile_folders(root):
        info_path = profile.folder / outputs.PROFILE_FILE
        if profile.info is None:
            raise FileNotFoundError(f"{info_path} does not exist; the prune stage writes it")
        missing = [f for f in ("enabled", *PROFILE_FIELDS) if f not in profile.info]
        if missing:
            raise ValueError(f"{info_path} lacks {missing}")
        if not profile.enabled:
            disabled.append(profile.name)
            continue
        runs_file = outputs.runs_path(root, profile.name)
        runs = outputs.read_object(runs_file, "attribute") if runs_file.is_file() else {}
        for prompt in profile.prompts_with(outputs.SCORES_FILE):
            results.append(_read_result(Path(root), profile.folder / prompt, profile.info, runs))
    return results, disabled


def _read_result(root: Path, directory: Path, info: dict, runs: dict) -> PromptResult:
    profile, prompt = directory.parent.name, directory.name
    for name in ARTIFACTS:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} does not exist; the prune stage writes it")
    graph_path = outputs.graph_path(root, profile, prompt)
    if not graph_path.is_file():
        raise FileNotFoundError(f"{graph_path} does not exist; the attribute stage writes it")
    scores_bytes = (directory / "scores.json").read_bytes()
    scores = outputs.read_object(directory / outputs.SCORES_FILE, "prune")
    missing = [k for k in (*SCORE_METRICS, "node_threshold", "edge_threshold") if k not in scores]
    if missing:
        raise ValueError(f"{directory / 'scores.json'} lacks {missing}")
    validation = outputs.validation_dir(root, profile) / f"{prompt}.json"
    validation = validation if validation.is_file() else None
    key = run_key(
        profile,
        prompt,
        scores_bytes,
        file_sha256(graph_path),
        validation.read_bytes() if validation else b"",
    )
    return PromptResult(
        profile,
        prompt,
        directory,
        info,
        scores,
        graph_path,
        read_header(graph_path),
        key,
        runs.get(prompt) or {},
        validation,
    )
