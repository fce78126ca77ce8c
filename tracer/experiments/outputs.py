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

import json
from dataclasses import dataclass
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


def features_dir(root: Path, feature_set: str) -> Path:
    """A transcoder set's feature pages (features@SET)."""
    return root / "features" / feature_set


def labels_path(feature_set: str, labels_root: Path = Path("labels")) -> Path:
    """A transcoder set's human labels (kept in git, beside the pipeline's outputs)."""
    return labels_root / f"{feature_set}.tsv"


def validation_dir(root: Path, profile: str) -> Path:
    return Path(root) / "validation" / profile


def read_object(path: Path, stage: str) -> dict:
    """A JSON object a stage wrote: FileNotFoundError when missing, ValueError when malformed,
    each naming the file and the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the {stage} stage writes it (`dvc repro`)")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); run the {stage} stage again") from err
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(document).__name__}")
    return document


@dataclass(frozen=True)
class ProfileFolder:
    """One profile's folder under `ROOT/profiles` (the prune stage's output)."""

    root: Path
    name: str
    info: dict | None  # profile.json, None when the folder has none
    prompts: tuple[str, ...]  # its prompt folders, sorted

    @property
    def folder(self) -> Path:
        return profile_dir(self.root, self.name)

    @property
    def enabled(self) -> bool:
        return bool(self.info and self.info.get("enabled", True))

    def prompts_with(self, *files: str, graph: bool = False) -> tuple[str, ...]:
        """Prompts whose folder holds every one of `files` (and, with `graph`, a graph file)."""
        return tuple(
            p
            for p in self.prompts
            if all((prompt_dir(self.root, self.name, p) / f).is_file() for f in files)
            and (not graph or graph_path(self.root, self.name, p).is_file())
        )


def subfolders(folder: Path) -> list[Path]:
    """Sorted subfolders, without hidden ones (a stage's temporary folders while it writes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def profile_folders(root: Path) -> list[ProfileFolder]:
    """Every profile folder under `root/profiles`, sorted by name: the one scan of the outputs
    that tracking, compare and the explorer share. A profile.json that names another profile is
    an error (a folder copied by hand)."""
    found = []
    for folder in subfolders(Path(root) / "profiles"):
        info = None
        if (folder / PROFILE_FILE).is_file():
            info = read_object(folder / PROFILE_FILE, "prune")
            if info.get("name", folder.name) != folder.name:
                raise ValueError(
                    f"{folder / PROFILE_FILE} names profile {info.get('name')!r}, not {folder.name!r}"
                )
        prompts = tuple(p.name for p in subfolders(folder))
        found.append(ProfileFolder(Path(root), folder.name, info, prompts))
    return found
