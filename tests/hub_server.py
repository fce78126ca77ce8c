"""A loopback HTTP server imitating the Hugging Face hub, for real huggingface_hub downloads.

It serves the endpoints huggingface_hub 2.4 calls (DESIGN.md section 7): the revision lookup, the
tree listing of a folder, recursive or not (with `lfs` sha256 for `*.safetensors` and `*.npz`, as
the hub lists LFS files) and `HEAD`/`GET` of `resolve` URLs, with byte ranges (`Range: bytes=a-b`,
answered 206, as the hub does; file headers are read that way); errors carry `X-Error-Code`. Every
request is recorded, and files can be served corrupted (same size, different bytes) or truncated.

    with FakeHubServer() as hub:
        sha = hub.add_repo("org/model", {"config.json": b"{}"})
        point_client_at(hub, monkeypatch, tmp_path / "hf-home")
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import transformers.utils.hub as transformers_hub
from huggingface_hub import constants

LFS_SUFFIXES = (".safetensors", ".bin", ".npz")


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tree_entry(path: str, data: bytes) -> dict:
    if not path.endswith(LFS_SUFFIXES):
        return {"type": "file", "path": path, "oid": git_oid(data), "size": len(data)}
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
    lfs = {"oid": sha256, "size": len(data), "pointerSize": len(pointer)}
    return {
        "type": "file",
        "path": path,
        "oid": git_oid(pointer.encode()),
        "size": len(data),
        "lfs": lfs,
    }


class FakeHubServer(ThreadingHTTPServer):
    """repos[repo_id] = (refs {branch: sha}, commits {sha: {path: bytes}}); see module docstring."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, tuple[dict[str, str], dict[str, dict[str, bytes]]]] = {}
        self.requests: list[str] = []
        self.corrupt: set[tuple[str, str]] = set()  # (repo_id, path): served with flipped bytes
        self.truncate: set[tuple[str, str]] = set()  # (repo_id, path): connection cut halfway

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit with `files` to `repo_id`, point `branch` at it; returns its sha."""
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
        sha = digest.hexdigest()
        refs, commits = self.repos.setdefault(repo_id, ({}, {}))
        refs[branch], commits[sha] = sha, dict(files)
        return sha

    def add_folder(self, repo_id: str, folder: Path, prefix: str = "", branch: str = "main") -> str:
        """Add every file under `folder` (at `prefix/` in the repo) as a new commit."""
        files = {
            "/".join(filter(None, [prefix, p.relative_to(folder).as_posix()])): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return self.add_repo(repo_id, files, branch)

    def __enter__(self) -> FakeHubServer:
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeHubServer

    def log_message(self, *args) -> None:
        pass

    def reply(self, code: int, body: bytes, headers: dict[str, str], send: int | None = None):
        self.send_response(code)
        for key, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body[:send])

    def fail(self, error_code: str) -> None:
        self.reply(404, b"{}", {"X-Error-Code": error_code, "Content-Type": "application/json"})

    def do_GET(self) -> None:
        hub = self.server
        url = urlsplit(self.path)
        path = unquote(url.path).strip("/")
        byte_range = self.headers.get("Range")
        hub.requests.append(f"{self.command} {path}" + (f" {byte_range}" if byte_range else ""))
        parts = path.split("/")
        # dataset repos: /api/datasets/ORG/NAME/... and /datasets/ORG/NAME/resolve/...; they are
        # kept in `repos` as "datasets/ORG/NAME"
        kind = ""
        if parts[:2] == ["api", "datasets"]:
            parts, kind = ["api", "models", *parts[2:]], "datasets/"
        elif parts[:1] == ["datasets"]:
            parts, kind = parts[1:], "datasets/"
        api = parts[:2] == ["api", "models"]
        if len(parts) < (6 if api else 5):  # e.g. huggingface_hub's own /api/agent-harnesses probe
            return self.fail("EntryNotFound")
        repo_id, rev = ("/".join(parts[2:4]), parts[5]) if api else ("/".join(parts[:2]), parts[3])
        repo_id = kind + repo_id
        if repo_id not in hub.repos:
            return self.fail("RepoNotFound")
        refs, commits = hub.repos[repo_id]
        sha = refs.get(rev, rev)
        if sha not in commits:
            return self.fail("RevisionNotFound")
        files, as_json = commits[sha], {"Content-Type": "application/json"}
        if api and parts[4] == "revision":
            info = {"id": repo_id.removeprefix(kind), "sha": sha}
            return self.reply(200, json.dumps(info).encode(), as_json)
        if api and parts[4] == "tree":
            folder = "/".join(parts[6:])
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            tree = _listing(files, folder, recursive)
            if folder and not tree:
                return self.fail("EntryNotFound")
            return self.reply(200, json.dumps(tree).encode(), as_json)
        file = "/".join(parts[4:])
        if file not in files:
            return self.fail("EntryNotFound")
        body, entry = files[file], _tree_entry(file, files[file])
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"'}
        if "lfs" in entry:
            headers["X-Linked-Etag"] = f'"{entry["lfs"]["oid"]}"'
            headers["X-Linked-Size"] = str(len(body))
        if (repo_id, file) in hub.corrupt:
            body = bytes(b ^ 0xFF for b in body)
        send = len(body) // 2 if (repo_id, file) in hub.truncate else None
        if byte_range and self.command == "GET":
            start, end = _byte_range(byte_range, len(body))
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            return self.reply(206, body[start : end + 1], headers)
        self.reply(200, body, headers, send)
        if send is not None:
            self.close_connection = True

    do_HEAD = do_GET


def _listing(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    """Tree entries under `folder`: every file below it, or its files and sub-folders only."""
    prefix = f"{folder}/" if folder else ""
    entries, folders = [], set()
    for path in sorted(p for p in files if p.startswith(prefix)):
        rest = path[len(prefix) :]
        if recursive or "/" not in rest:
            entries.append(_tree_entry(path, files[path]))
        else:
            folders.add(prefix + rest.split("/")[0])
    return entries + [{"type": "directory", "path": f, "oid": git_oid(f.encode())} for f in folders]


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """(first, last) byte of `bytes=a-b`, `bytes=a-` or `bytes=-n`, clipped to the file."""
    first, _, last = header.removeprefix("bytes=").partition("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(size - 1, int(last) if last else size - 1)


def point_client_at(hub: FakeHubServer, monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> Path:
    """Send huggingface_hub's requests to `hub` and its cache under `hf_home`; returns the cache.

    huggingface_hub reads HF_ENDPOINT and HF_HOME at import time, so in-process tests patch its
    `constants`; the environment is set too, for subprocesses started by the test.
    """
    cache = hf_home / "hub"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # transformers keeps one HfApi per process, made with the endpoint of its first use
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    return cache
