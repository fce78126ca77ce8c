"""References to the Hugging Face hub: `hf://` URIs, downloads at a pinned revision, clear errors.

Everything goes through huggingface_hub, so its cache, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and
`HF_ENDPOINT` apply as usual. URI forms accepted (model repos only):
- `hf://org/repo/sub/path@rev` (this project's configs: the revision after the path);
- `hf://org/repo@rev/sub/path` (huggingface_hub's own form);
- `hf://org/repo/sub/path?revision=rev` (circuit-tracer's configs).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs

import httpx2
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub import utils as hf_utils
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

HF_SCHEME = "hf://"
_COMMIT = re.compile(r"[0-9a-f]{40}")
# What huggingface_hub raises when a repo, revision or file cannot be had (connection included).
HUB_ERRORS = (
    HfHubHTTPError,
    EntryNotFoundError,
    HFValidationError,
    ConnectionError,
    TimeoutError,
    httpx2.HTTPError,
)


@dataclass(frozen=True)
class HfRef:
    """A file or folder in a hub model repo; `revision` None means the default branch."""

    repo_id: str
    path_in_repo: str = ""
    revision: str | None = None

    @property
    def uri(self) -> str:
        path = f"/{self.path_in_repo}" if self.path_in_repo else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_SCHEME}{self.repo_id}{path}{rev}"

    def child(self, relative: str) -> HfRef:
        """The reference to `relative` (a posix path) inside this folder."""
        return HfRef(self.repo_id, _join_in_repo(self.path_in_repo, relative), self.revision)


class HubError(ValueError):
    """A hub reference that could not be resolved; the message names repo, path and revision."""

    def __init__(self, ref: HfRef, reason: str):
        self.ref = ref
        super().__init__(
            f"cannot resolve {ref.uri} (repo {ref.repo_id!r}, path {ref.path_in_repo or '/'!r}, "
            f"revision {ref.revision or 'main'!r}): {reason}"
        )


def is_hf_uri(text: str | Path) -> bool:
    return isinstance(text, str) and text.startswith(HF_SCHEME)


def parse_hf_uri(uri: str) -> HfRef:
    """Split an `hf://` URI (any of the forms in the module docstring) into repo, path, revision."""
    if not is_hf_uri(uri):
        raise ValueError(f"not a hub URI: {uri!r}; expected hf://org/repo[/path][@revision]")
    body, _, query = uri.partition("?")
    query_rev = None
    if query:
        params = parse_qs(query, keep_blank_values=True)
        if set(params) != {"revision"} or len(params["revision"]) != 1:
            raise ValueError(f"hub URI {uri!r}: the only query parameter allowed is revision=")
        query_rev = params["revision"][0]
    try:
        parsed = hf_utils.parse_hf_uri(body)
        hf_utils.validate_repo_id(parsed.id)
    except (ValueError, HFValidationError) as e:
        raise ValueError(f"invalid hub URI {uri!r}: {e}") from e
    if parsed.type != "model":
        raise ValueError(f"hub URI {uri!r} names a {parsed.type} repo; only model repos work")
    path, revision = parsed.path_in_repo, parsed.revision
    if revision is None and "@" in path:
        # This project's form puts the revision last; huggingface_hub reads it as part of a name.
        path, _, revision = path.rpartition("@")
    revisions = {r for r in (revision, query_rev) if r is not None}
    if len(revisions) > 1:
        raise ValueError(f"hub URI {uri!r} gives two revisions: {sorted(revisions)}")
    revision = revisions.pop() if revisions else None
    if revision == "" or (revision is not None and revision.strip() != revision):
        raise ValueError(f"hub URI {uri!r} has an empty or padded revision {revision!r}")
    return HfRef(parsed.id, _join_in_repo("", path), revision)


def resolve_repo_path(ref: HfRef, *, allow_patterns: list[str] | None = None) -> Path:
    """Download `ref` (at its revision) into the huggingface_hub cache and return its local path.

    With `allow_patterns` (glob patterns relative to `ref.path_in_repo`) the path is a folder and
    only the matching files are fetched. Without them, a path with a suffix is one file and any
    other path is a whole folder.
    """
    path = ref.path_in_repo
    try:
        if allow_patterns is None and PurePosixPath(path).suffix:
            return Path(hf_hub_download(ref.repo_id, path, revision=ref.revision))
        if allow_patterns is not None:
            patterns = [_join_in_repo(path, p) for p in allow_patterns]
        else:
            patterns = [f"{path}/*"] if path else None
        root = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))
    except HUB_ERRORS as e:
        raise HubError(ref, error_reason(e)) from e
    local = root / path if path else root
    if not local.exists():
        raise HubError(ref, f"{path!r} is not in the downloaded snapshot {root}")
    return local


def cached_commit(local_path: Path) -> str | None:
    """The commit sha of a file or folder inside huggingface_hub's cache (`snapshots/<sha>/...`)."""
    parts = Path(local_path).parts
    for i in range(len(parts) - 1):
        if parts[i] == "snapshots" and _COMMIT.fullmatch(parts[i + 1]):
            return parts[i + 1]
    return None


def looks_local(reference: str | Path) -> bool:
    """Whether a model or transcoder reference names a local path rather than the hub.

    The one rule for both: a `Path`, a string starting with `.`, `/` or `~`, one with more than one
    `/` (hub repo ids are `name` or `org/name`), or an existing folder is local; `hf://` URIs and
    everything else are hub references.
    """
    if isinstance(reference, Path):
        return True
    if is_hf_uri(reference):
        return False
    return (
        reference.startswith((".", "/", "~"))
        or reference.count("/") > 1
        or Path(reference).expanduser().is_dir()
    )


def resolve_model(name_or_path: str | Path, revision: str | None = None) -> Path | str:
    """A model as transformers takes it: an existing local folder, else a hub repo id."""
    path = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not path.is_dir():
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    if path.is_dir():
        if revision is not None:
            raise ValueError(
                f"model {str(name_or_path)!r} is a local folder; a revision ({revision!r}) only "
                "applies to hub repo ids"
            )
        return path
    name = str(name_or_path)
    if is_hf_uri(name):
        raise ValueError(
            f"model {name!r}: give the repo id ('org/name') and the revision separately, not a URI"
        )
    try:
        hf_utils.validate_repo_id(name)
    except HFValidationError as e:
        raise ValueError(
            f"model {name!r} is neither an existing local folder nor a valid hub repo id "
            f"('org/name'): {e}"
        ) from e
    return name


def _join_in_repo(base: str, relative: str) -> str:
    """Join posix paths inside a repo, refusing absolute paths and paths that leave the repo."""
    if relative.startswith("/"):
        raise ValueError(f"path {relative!r} must be relative to the repo folder {base or '/'!r}")
    joined = posixpath.normpath(posixpath.join(base, relative)) if base or relative else ""
    if joined == ".":
        return ""
    if joined == ".." or joined.startswith("../"):
        raise ValueError(f"path {relative!r} leaves the repo (from folder {base or '/'!r})")
    return joined


def error_reason(error: Exception) -> str:
    # Order matters: LocalEntryNotFoundError is an EntryNotFoundError, GatedRepoError a
    # RepositoryNotFoundError.
    if isinstance(error, GatedRepoError):
        return "the repo is gated; log in with a token that has access"
    if isinstance(error, RepositoryNotFoundError):
        return "repository not found (or private and no valid token)"
    if isinstance(error, RevisionNotFoundError):
        return "revision not found in the repo"
    if isinstance(error, LocalEntryNotFoundError):
        return (
            "not in the local cache and the hub cannot be reached (offline mode or no connection); "
            f"check repo, path and revision ({type(error).__name__})"
        )
    if isinstance(error, EntryNotFoundError):
        return "file not found in the repo at this revision"
    return f"hub request failed: {type(error).__name__}: {error}"
