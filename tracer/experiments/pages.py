"""Which feature pages and labels belong to a profile, found from the stages' outputs alone.

A profile's pages are those built for its transcoder set as the fetch stage recorded it (source
and revision, `fetched/PROFILE/fetched.json`; profile.json's when there is no fetch record):
profiles sharing a set share its pages, and pages of other weights are never used. When several
folders qualify, the one built by the profile itself wins. The human labels are
`labels/SET.tsv`, SET the pages folder's name.
"""

from __future__ import annotations

import json
from pathlib import Path

from tracer.experiments import outputs
from tracer.features.labels import Labels
from tracer.features.storage import INDEX_FILE


def transcoder_identity(root: Path, profile: str, info: dict) -> tuple[str | None, str | None]:
    """(source, revision) of a profile's transcoders as its pages' index.json records them."""
    fetched = outputs.fetched_dir(Path(root), profile) / outputs.FETCHED_FILE
    if fetched.is_file():
        record = outputs.read_object(fetched, "fetch").get("transcoders", {})
        return record.get("source"), record.get("revision")
    return info.get("transcoders"), info.get("transcoder_revision")


def find_pages(root: Path, profile: str, info: dict) -> Path | None:
    """The pages folder under `root/features` for a profile (profile.json's fields), or None."""
    identity = transcoder_identity(root, profile, info)
    found = []
    for folder in outputs.subfolders(Path(root) / "features"):
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not a pages folder (or not yet one)
        if (index.get("transcoders"), index.get("transcoder_revision")) == identity:
            found.append((index.get("profile") != profile, folder.name, folder))
    return min(found)[2] if found else None


def profile_labels(
    root: Path, profile: str, info: dict, labels_root: Path = Path("labels")
) -> Labels | None:
    """Labels of the profile's transcoder set (human file over automatic), None without pages."""
    folder = find_pages(root, profile, info)
    if folder is None:
        return None
    return Labels.open(folder, outputs.labels_path(folder.name, labels_root))
