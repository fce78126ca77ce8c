"""Where the pipeline's stages put their files under an outputs root (default `outputs/`).

    fetched/P/fetched.json          fetch@P: what was fetched (source, commit sha, content hash)
    fetched/P/model/, transcoders/  fetch@P: hub downloads, cached by DVC (local folders stay put)
    graphs/P/profile.json           attribute@P: the profile's settings
    graphs/P/PROMPT.safetensors     attribute@P: the full graph of each prompt
    runs/P.json                     attribute@P: seconds per phase and peak memory per prompt
    profiles/P/profile.json         prune@P
    profiles/P/PROMPT/              prune@P: pruned.json (viewer), scores.json, pruning_curve.png
    validation/P/PROMPT.csv|.json   validate@P: predicted vs measured ablation effects
    metrics/P.json, plots/P.json    prune@P: `dvc metrics show`, `dvc plots show`
    metrics/validation/P.json       validate@P: `dvc metrics show`
    compare/                        compare: cross-profile tables
    tracking.json                   track: what was logged to MLflow

Every file that DVC hashes holds only results, never timings or memory peaks, so that the same
inputs give byte-identical outputs (a fresh clone re-running a stage leaves `dvc.lock` as it was
and logs nothing new). Timings go to `runs/`, which no stage declares.
"""

from __future__ import annotations

from pathlib import Path

PROFILE_FILE = "profile.json"
GRAPH_SUFFIX = ".safetensors"
SCORES_FILE = "scores.json"
PRUNED_FILE = "pruned.json"
CURVE_PLOT = "pruning_curve.png"
FETCHED_FILE = "fetched.json"


def fetched_dir(root: Path, profile: str) -> Path:
    return Path(root) / "fetched" / profile


def graphs_dir(root: Path, profile: str) -> Path:
    return Path(root) / "graphs" / profile


def graph_path(root: Path, profile: str, prompt: str) -> Path:
    return graphs_dir(root, profile) / f"{prompt}{GRAPH_SUFFIX}"


def runs_path(root: Path, profile: str) -> Path:
    return Path(root) / "runs" / f"{profile}.json"


def profile_dir(root: Path, profile: str) -> Path:
    return Path(root) / "profiles" / profile


def prompt_dir(root: Path, profile: str, prompt: str) -> Path:
    return profile_dir(root, profile) / prompt


def validation_dir(root: Path, profile: str) -> Path:
    return Path(root) / "validation" / profile
