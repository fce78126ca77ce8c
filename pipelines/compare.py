"""DVC stage compare: cross-profile tables from the graphs stage's outputs.

Reads `outputs/profiles/` (and the transcoder sets its profile.json files name, relative to the
repository root) and writes `outputs/compare/`: scores.csv, sizes.csv, layers.csv, matching.csv and
summary.json (see `tracer.experiments.compare`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tracer.experiments.compare import write_tables

ROOT = Path("outputs")
OUT = ROOT / "compare"


def main() -> None:
    summary = write_tables(ROOT, OUT)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
