"""DVC stage compare: cross-profile tables from the graphs stage's outputs.

Reads `outputs/profiles/` (and the transcoder sets its profile.json files name, relative to the
repository root) and writes `outputs/compare/`: scores.csv, sizes.csv, layers.csv, matching.csv,
features.csv (labelled from each profile's feature pages) and summary.json (see
`tracer.experiments.compare`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tracer.experiments.compare import find_profiles, write_tables
from tracer.experiments.pages import profile_labels

ROOT = Path("outputs")
OUT = ROOT / "compare"


def main() -> None:
    labels = {run.name: profile_labels(ROOT, run.name, run.info) for run in find_profiles(ROOT)[0]}
    summary = write_tables(ROOT, OUT, labels={k: v for k, v in labels.items() if v is not None})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
