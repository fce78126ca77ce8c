"""DVC stage track: log the pipeline's graphs, scores and plots to MLflow (new results only).

The store is `MLFLOW_TRACKING_URI` if set, else `mlflow.db` (sqlite) at the repository root.
Subgraphs saved from the explorer (`subgraphs/PROFILE/PROMPT/*.json` beside the outputs folder)
go with their result's run, also one logged before, when they are new or changed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tracer.atomic import write_json
from tracer.experiments import outputs
from tracer.experiments.pages import find_pages
from tracer.experiments.params import load_params
from tracer.experiments.subgraphs import subgraph_files
from tracer.experiments.tracking import ensure_store, git_tags, log_pipeline, tracking_uri
from tracer.features.storage import SUMMARY_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]


def feature_files(root: Path) -> dict[str, list[Path]]:
    """Per profile: its page set's summary and human labels file, where they exist."""
    found = {}
    for profile in outputs.profile_folders(root):
        folder = find_pages(root, profile.name, profile.info or {})
        if folder is not None:
            candidates = [folder / SUMMARY_FILE, REPO_ROOT / outputs.labels_path(folder.name)]
            found[profile.name] = [path for path in candidates if path.is_file()]
    return found


def saved_subgraphs(root: Path) -> dict[str, list[Path]]:
    """Per result `profile/prompt`: the subgraph files saved for it beside the outputs folder."""
    project = Path(root).resolve().parent
    found = {}
    for profile in outputs.profile_folders(root):
        for prompt in profile.prompts:
            files = subgraph_files(project, profile.name, prompt)
            if files:
                found[f"{profile.name}/{prompt}"] = files
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT / "outputs", help="stage outputs")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (params.yaml)")
    parser.add_argument(
        "--summary", type=Path, help="also write the logged results' run keys (JSON) here"
    )
    args = parser.parse_args(argv)
    if args.experiment is None:
        args.experiment = load_params(REPO_ROOT / "params.yaml").tracking.experiment
    # experiments (`dvc exp run`) run in temporary copies: log to the main repository's store
    main_repo = Path(os.environ.get("DVC_ROOT", REPO_ROOT))
    uri = tracking_uri(main_repo / "mlflow.db")
    ensure_store(uri, args.experiment)
    summary = log_pipeline(
        args.root,
        experiment=args.experiment,
        uri=uri,
        tags=git_tags(REPO_ROOT),
        dvc_lock=REPO_ROOT / "dvc.lock",
        feature_files=feature_files(args.root),
        subgraph_files=saved_subgraphs(args.root),
    )
    print(json.dumps(summary, indent=2))
    if args.summary is not None:
        # what is in the store, not what this call added: the same results give the same file
        record = {k: summary[k] for k in ("disabled_profiles", "run_keys")}
        write_json(args.summary, record | {"experiment": args.experiment})


if __name__ == "__main__":
    main()
