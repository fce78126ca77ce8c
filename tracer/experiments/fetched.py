"""What the fetch stage recorded, read back: the record of a profile and its replacement model.

Kept apart from `tracer.experiments.fetch` so that fetching never depends on the engine's model
code (the stages that load models do).
"""

from __future__ import annotations

import json
from pathlib import Path

from tracer.experiments import outputs


def read_record(root: Path, profile: str) -> dict:
    """The fetch stage's record of a profile (`ROOT/fetched/PROFILE/fetched.json`)."""
    path = outputs.fetched_dir(Path(root), profile) / outputs.FETCHED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the fetch stage first (`dvc repro`)")
    return json.loads(path.read_text())


def load_model(fetched: dict):
    """The profile's replacement model from the folders a fetch record names."""
    from tracer.model.replacement import ReplacementModel

    model, transcoders = fetched["model"], fetched["transcoders"]
    replacement = ReplacementModel.from_pretrained(
        model["path"], transcoders["path"], dtype=fetched["dtype"]
    )
    # Graphs name what was fetched (hub id and commit), not the local folder it was copied to.
    replacement.model_id, replacement.model_revision = model["source"], model["revision"]
    replacement.transcoders.source = transcoders["source"]
    replacement.transcoders.revision = transcoders["revision"]
    return replacement
