"""References to the Hugging Face hub: `hf://` URIs, downloads at a pinned revision, clear errors.

Also what is known without downloading: a branch resolved to its commit (`pin`), a folder's or a
repo's file listing with sizes and checksums (`list_folder`, `repo_files`) and a file read by HTTP
range requests (`open_remote`, for file headers).
Everything goes through huggingface_hub, so its cache, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and
`HF_ENDPOINT` apply as usual. URI forms accepted (model repos only):
- `hf://org/repo/sub/path@rev` (this project's configs: the revision after the path);
- `hf://org/repo@rev/sub/path` (huggingface_hub's own form);
- `hf://org/repo/sub/path?revision=rev` (circuit-tracer's configs).
"""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs

import httpx2
from huggingface_hub import (
    HfApi,
    RepoFile,
    constants,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
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
# What a model needs to load with transformers: config, weights and tokenizer files, nothing else.
MODEL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
]
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


def is_commit(revision: str | None) -> bool:
    return revision is not None and _COMMIT.fullmatch(revision) is not None


def pin(ref: HfRef, pins: dict[tuple[str, str | None], str | None]) -> HfRef:
    """`ref` at a commit sha: a branch or tag is looked up once per repo (remembered in `pins`).

    Offline, the commit comes from the cache's `refs/` (as huggingface_hub resolves it there);
    a revision the cache does not know is left as it is, for the download to report.
    """
    if is_commit(ref.revision):
        return ref
    key = (ref.repo_id, ref.revision)
    if key not in pins:
        revision = ref.revision or constants.DEFAULT_REVISION
        if constants.HF_HUB_OFFLINE:
            cached = repo_cache(ref.repo_id) / "refs" / revision
            pins[key] = cached.read_text().strip() if cached.is_file() else ref.revision
        else:
            try:
                pins[key] = HfApi().model_info(ref.repo_id, revision=revision).sha
            except HUB_ERRORS as e:
                raise HubError(ref, error_reason(e)) from e
    return HfRef(ref.repo_id, ref.path_in_repo, pins[key])


def list_folder(ref: HfRef) -> list[str]:
    """Names of the files directly inside the hub folder `ref`, without downloading them.

    One listing request; offline, the files of the cached snapshot.
    """
    if constants.HF_HUB_OFFLINE:
        local = resolve_repo_path(ref, allow_patterns=["*"])
        return sorted(p.name for p in local.iterdir() if p.is_file())
    try:
        entries = HfApi().list_repo_tree(
            ref.repo_id, path_in_repo=ref.path_in_repo or None, revision=ref.revision
        )
        paths = [e.path for e in entries if isinstance(e, RepoFile)]
    except HUB_ERRORS as e:
        raise HubError(ref, error_reason(e)) from e
    parent = PurePosixPath(ref.path_in_repo or ".")
    return sorted(PurePosixPath(p).name for p in paths if PurePosixPath(p).parent == parent)


def repo_files(repo_id: str, revision: str, repo_type: str = "model") -> dict[str, RepoFile]:
    """Every file of a repo at `revision` with its size and checksum (LFS sha256 or git blob id)."""
    try:
        tree = HfApi().list_repo_tree(
            repo_id, revision=revision, recursive=True, repo_type=repo_type
        )
        return {e.path: e for e in tree if isinstance(e, RepoFile)}
    except HUB_ERRORS as e:
        raise HubError(HfRef(repo_id, "", revision), error_reason(e)) from e


class _RemoteFile(io.RawIOBase):
    """A hub file read with HTTP range requests: only the bytes asked for cross the network."""

    def __init__(self, ref: HfRef):
        self.ref, self.position = ref, 0
        self.url = hf_hub_url(ref.repo_id, ref.path_in_repo, revision=ref.revision)
        content_range = self._get("bytes=0-0").headers.get("Content-Range", "bytes 0-0/0")
        self.size = int(content_range.rpartition("/")[2])  # "bytes 0-0/<size>"

    def _get(self, byte_range: str) -> httpx2.Response:
        try:
            response = hf_utils.get_session().get(
                self.url, headers={**hf_utils.build_hf_headers(), "Range": byte_range}
            )
            hf_utils.hf_raise_for_status(response)
        except HUB_ERRORS as e:
            raise HubError(self.ref, error_reason(e)) from e
        if response.status_code != 206:
            raise HubError(self.ref, f"the server ignored a range request ({response.status_code})")
        return response

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.size, self.position + len(buffer))
        if end <= self.position:
            return 0
        data = self._get(f"bytes={self.position}-{end - 1}").content
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def open_remote(ref: HfRef) -> io.BufferedReader:
    """A seekable binary file over the hub file `ref` that downloads only what is read."""
    return io.BufferedReader(_RemoteFile(ref), buffer_size=1 << 16)


def repo_cache(repo_id: str) -> Path:
    """The repo's folder in huggingface_hub's cache (blobs/, refs/, snapshots/)."""
    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


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
