"""DVC stage fetch@PROFILE: fetch a profile's model and transcoders, pinned and checksummed.

Writes `outputs/fetched/PROFILE.json`: for each of model and transcoders its source, the commit sha
served (None for a local folder), the local path and a content hash; a disabled profile gets
{"enabled": false} and fetches nothing.

Hub downloads go to the huggingface_hub cache (`HF_HOME`, default `~/.cache/huggingface`), not to a
DVC output: DVC caches only the small JSON record. Since the record holds the commit sha and the
content hash, a changed upstream branch or a changed local folder changes the record and reruns
the stages that depend on it; the weights themselves are kept, and shared between profiles and
checkouts, by huggingface_hub's cache. To have DVC store the weights too, a later step can
download into a folder under `outputs/` and declare that folder a (cached) DVC output.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tracer.atomic import write_json
from tracer.fetch import fetch_profile
from tracer.params import load_params

OUT = Path("outputs/fetched")


def main(name: str) -> None:
    profiles = load_params().profiles
    if name not in profiles:
        raise SystemExit(f"unknown profile {name!r}; params.yaml has {sorted(profiles)}")
    profile = profiles[name]
    if not profile.enabled:
        document = {"enabled": False}
    else:
        fetched = fetch_profile(
            profile.model,
            profile.transcoders,
            revision=profile.revision,
            transcoder_revision=profile.transcoder_revision,
        )
        document = {"enabled": True, "dtype": profile.dtype, **fetched}
    write_json(OUT / f"{name}.json", document, indent=2, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
