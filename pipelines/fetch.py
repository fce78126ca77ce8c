"""DVC stage fetch@PROFILE: fetch a profile's model and transcoders, pinned and checksummed.

Writes `outputs/fetched/PROFILE/`: `fetched.json` records, for each of model and transcoders, its
source, the commit sha served (None for a local folder), the folder to load it from and a content
hash; a disabled profile gets {"enabled": false} and fetches nothing.

Local folders (the zoo) are loaded where they are, unless their config names hub files: such a set
is fetched whole like a hub set. Hub repos are downloaded through
huggingface_hub's cache (`HF_HOME`; a second profile using the same repo and commit makes no
request) and copied, as hard links where possible, to `outputs/fetched/PROFILE/model/` and
`transcoders/`, which DVC caches. A transcoder set arrives with every file its config refers to,
in whatever repo, verified, under a rewritten config.yaml that names only files inside the folder:
`dvc push` to a remote and `dvc pull` on a machine without hub access (`HF_HUB_OFFLINE=1`) restores
it, `dvc repro` there finds this stage up to date and attribution makes no request. A failure
(a checksum that does not match, a missing file) leaves the previous output in place.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tracer.atomic import write_folder, write_json
from tracer.experiments import outputs
from tracer.experiments.fetch import fetch_profile, materialize
from tracer.experiments.params import load_params

ROOT = Path("outputs")


def main(name: str) -> None:
    profiles = load_params().profiles
    if name not in profiles:
        raise SystemExit(f"unknown profile {name!r}; params.yaml has {sorted(profiles)}")
    profile = profiles[name]
    final = outputs.fetched_dir(ROOT, name)

    def fill(folder: Path) -> None:
        if not profile.enabled:
            document = {"enabled": False}
        else:
            fetched = fetch_profile(
                profile.model,
                profile.transcoders,
                revision=profile.revision,
                transcoder_revision=profile.transcoder_revision,
            )
            for part, record in fetched.items():
                if record["revision"] is not None or "files" in record:  # hub files in it
                    laid_out = materialize(record, folder / part)
                    fetched[part] = {**laid_out, "path": str(final / part)}
            document = {"enabled": True, "dtype": profile.dtype, **fetched}
        write_json(folder / outputs.FETCHED_FILE, document)

    write_folder(final, fill)


if __name__ == "__main__":
    main(sys.argv[1])
