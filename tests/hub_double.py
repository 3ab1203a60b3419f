"""A test double of the Hugging Face Hub: just enough of its HTTP API for huggingface_hub 2.x downloads.

Two local HTTP servers bound to 127.0.0.1 on random ports: the *Hub* and the *CDN* that large (LFS) files redirect
to, as on huggingface.co (a different origin, so huggingface_hub drops the token on the redirect). Point a process
at it with ``HF_ENDPOINT=double.endpoint`` (see :meth:`HubDouble.env`); huggingface_hub reads that variable when it is
imported, so run the code under test in a subprocess.

Endpoints (those that ``HfApi.model_info``, ``snapshot_download`` and ``hf_hub_download`` of huggingface_hub 2.4 use):

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` → ``{id, sha, private, gated, siblings}``;
  siblings carry ``size``/``blobId``/``lfs`` when ``?blobs=true``.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` → ``[{type, oid, size, path, lfs?}]`` (``recursive`` honoured).
- ``HEAD|GET /{repo}/resolve/{rev}/{file}`` → small files: 200 with ``X-Repo-Commit``, ``ETag`` (git blob id) and
  ``Content-Length``; LFS files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.model``): 302 to the CDN with
  ``X-Linked-Etag`` (sha256), ``X-Linked-Size``, ``X-Repo-Commit`` and ``Location``.
- ``HEAD|GET`` on the CDN ``/lfs/{sha256}`` → the bytes (``Range: bytes=N-`` answered with 206).

Errors carry the ``X-Error-Code`` header huggingface_hub maps to its exception types: unknown or private repo →
401/404 ``RepoNotFound``; unknown revision → 404 ``RevisionNotFound``; missing file → 404 ``EntryNotFound``;
gated repo file without a valid ``Authorization: Bearer <token>`` → 401 (no token) / 403 (other token) ``GatedRepo``
(the API of a gated repo stays public, as on the Hub). Any other path → 404 without a code.

Every request is logged (method, path, kind, repo, file, status) so tests can prove what was never requested.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model")


@dataclass(frozen=True)
class Request:
    """One request the double answered."""

    method: str
    path: str
    kind: str  # "info", "tree", "resolve", "cdn" or "unknown"
    repo: str | None
    file: str | None
    status: int
    authorized: bool


@dataclass
class RepoFile:
    """A file as the double serves it."""

    path: str
    data: bytes
    blob_id: str
    sha256: str | None  # set for LFS files

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class Repo:
    """A model repo with one commit, reachable as ``main``, its sha, or any extra branch/tag in ``refs``."""

    repo_id: str
    sha: str
    files: dict[str, RepoFile]
    gated: bool = False
    private: bool = False
    hidden: set[str] = field(default_factory=set)  # not listed and not served: an incomplete upload
    unavailable: set[str] = field(default_factory=set)  # listed but 404 on download: an inconsistent Hub
    corrupt: set[str] = field(default_factory=set)  # served with one byte changed (same length)
    refs: set[str] = field(default_factory=lambda: {"main"})

    def listed(self) -> list[RepoFile]:
        return [f for name, f in sorted(self.files.items()) if name not in self.hidden]


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubDouble:
    """A test double of the Hugging Face Hub (see the module docstring); use as a context manager.

    Example::

        with HubDouble() as hub:
            sha = hub.add_repo("01-ai/tiny", folder)
            env = hub.env(tmp_path / "hf-home")
            subprocess.run([...], env={**os.environ, **env})
            assert not hub.requests_for("pytorch_model.bin")
    """

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens: set[str] = set()
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._by_sha256: dict[str, tuple[Repo, RepoFile]] = {}
        self._hub = self._server(_HubHandler)
        self._cdn = self._server(_CdnHandler)
        self._threads: list[threading.Thread] = []

    # -- setup -----------------------------------------------------------------------------------------------
    def _server(self, handler: type) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.block_on_close = False
        server.double = self  # type: ignore[attr-defined]
        return server

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        gated: bool = False,
        private: bool = False,
        hidden: tuple[str, ...] = (),
        unavailable: tuple[str, ...] = (),
        corrupt: tuple[str, ...] = (),
        refs: tuple[str, ...] = (),
    ) -> str:
        """Serve ``folder`` (read now, recursively) as ``repo_id``; return its commit sha."""
        files = {}
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            lfs = hashlib.sha256(data).hexdigest() if rel.endswith(LFS_SUFFIXES) else None
            files[rel] = RepoFile(rel, data, _blob_id(data), lfs)
        digest = hashlib.sha1(repo_id.encode())
        for f in files.values():
            digest.update(f.path.encode() + f.blob_id.encode())
        repo = Repo(repo_id, digest.hexdigest(), files, gated, private, set(hidden), set(unavailable), set(corrupt), {"main", *refs})
        with self._lock:
            self.repos[repo_id] = repo
            for f in files.values():
                if f.sha256:
                    self._by_sha256[f.sha256] = (repo, f)
        return repo.sha

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> HubDouble:
        for server in (self._hub, self._cdn):
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="hub-double", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    @property
    def endpoint(self) -> str:
        """The value for ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def env(self, hf_home: Path, token: str | None = None, offline: bool = False) -> dict[str, str]:
        """Environment variables that point huggingface_hub at this double with a private cache."""
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        if token is not None:
            env["HF_TOKEN"] = token
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        return env

    # -- request log -----------------------------------------------------------------------------------------
    def record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)

    def requests(self, kind: str | None = None, method: str | None = None) -> list[Request]:
        """Logged requests, optionally of one kind (``info``, ``tree``, ``resolve``, ``cdn``, ``unknown``)."""
        with self._lock:
            return [r for r in self.log if (kind is None or r.kind == kind) and (method is None or r.method == method)]

    def requests_for(self, file: str) -> list[Request]:
        """Every request that named (resolve) or fetched (CDN) ``file``."""
        with self._lock:
            return [r for r in self.log if r.file == file]

    def downloaded(self) -> set[str]:
        """Files whose bytes were sent (GET answered 200/206, on the Hub or the CDN)."""
        with self._lock:
            return {r.file for r in self.log if r.method == "GET" and r.kind in ("resolve", "cdn") and r.status in (200, 206) and r.file}

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def find_lfs(self, sha256: str) -> tuple[Repo, RepoFile] | None:
        with self._lock:
            return self._by_sha256.get(sha256)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects; every answer has Content-Length

    @property
    def double(self) -> HubDouble:
        return self.server.double  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence the default stderr log
        pass

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, kind: str = "unknown",
              repo: str | None = None, file: str | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        token = self._token()
        self.double.record(Request(self.command, self.path, kind, repo, file, status, token in self.double.tokens))

    def _error(self, status: int, code: str, message: str, *, kind: str, repo: str, file: str | None = None,
               commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit  # the Hub names the commit on a 404 of a file (cached as .no_exist)
        self._send(status, json.dumps({"error": message}).encode(), headers, kind=kind, repo=repo, file=file)


class _HubHandler(_Handler):
    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if len(parts) >= 4 and parts[:2] == ["api", "models"] and self.command == "GET":
            repo_id = "/".join(parts[2:4])
            rest = parts[4:]
            if not rest:
                return self._info(repo_id, "main", query)
            if rest[0] == "revision" and len(rest) == 2:
                return self._info(repo_id, rest[1], query)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        self._send(404, b"not found", {"Content-Type": "text/plain"})

    def _repo(self, repo_id: str, kind: str, file: str | None = None) -> Repo | None:
        """The repo, or None after answering the error the Hub gives for an unknown or private repo."""
        repo = self.double.repos.get(repo_id)
        authorized = self._token() in self.double.tokens
        if repo is None or (repo.private and not authorized):
            # The Hub does not tell unknown from private: 401 without a valid token, 404 with one.
            status = 404 if authorized else 401
            self._error(status, "RepoNotFound", "Repository not found", kind=kind, repo=repo_id, file=file)
            return None
        return repo

    def _revision(self, repo: Repo, rev: str, kind: str, file: str | None = None) -> bool:
        if rev in repo.refs or rev == repo.sha:
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", kind=kind, repo=repo.repo_id, file=file)
        return False

    def _info(self, repo_id: str, rev: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id, "info")
        if repo is None or not self._revision(repo, rev, "info"):
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for f in repo.listed():
            entry: dict[str, object] = {"rfilename": f.path}
            if blobs:
                entry.update(size=f.size, blobId=f.blob_id)
                if f.sha256:
                    entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(entry)
        body = {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.sha,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, kind="info", repo=repo_id)

    def _tree(self, repo_id: str, rev: str, prefix: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id, "tree")
        if repo is None or not self._revision(repo, rev, "tree"):
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        base = prefix + "/" if prefix else ""
        entries, folders = [], set()
        for f in repo.listed():
            if not f.path.startswith(base):
                continue
            rest = f.path[len(base):]
            if "/" in rest:
                parts = rest.split("/")
                depth = len(parts) - 1 if recursive else 1
                for i in range(1, depth + 1):
                    folders.add(base + "/".join(parts[:i]))
                if not recursive:
                    continue
            entry: dict[str, object] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
            if f.sha256:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(folders)]
        self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, kind="tree", repo=repo_id)

    def _resolve(self, repo_id: str, rev: str, file: str) -> None:
        repo = self._repo(repo_id, "resolve", file)
        if repo is None or not self._revision(repo, rev, "resolve", file):
            return
        token = self._token()
        if repo.gated and token not in self.double.tokens:
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in."
            self._error(401 if token is None else 403, "GatedRepo", message, kind="resolve", repo=repo_id, file=file)
            return
        entry = repo.files.get(file)
        if entry is None or file in repo.hidden or file in repo.unavailable:
            self._error(404, "EntryNotFound", "Entry not found", kind="resolve", repo=repo_id, file=file, commit=repo.sha)
            return
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{entry.blob_id}"', "Accept-Ranges": "bytes"}
        if entry.sha256:
            headers.update({
                "Location": f"{self.double.cdn}/lfs/{entry.sha256}?repo={repo_id}&file={file}",
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(entry.size),
                "Content-Length": "0",
            })
            self._send(302, b"", headers, kind="resolve", repo=repo_id, file=file)
            return
        headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(entry.size)})
        self._send(200, entry.data, headers, kind="resolve", repo=repo_id, file=file)


class _CdnHandler(_Handler):
    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _serve(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        found = self.double.find_lfs(parts[1]) if len(parts) == 2 and parts[0] == "lfs" else None
        if found is None:
            self._send(404, b"no such object", {"Content-Type": "text/plain"}, kind="cdn")
            return
        repo, entry = found
        data = entry.data
        if entry.path in repo.corrupt and data:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])  # flip the last byte, keep the length
        status, start = 200, 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged[6:-1])
            status = 206
        body = data[start:]
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body)), "ETag": f'"{entry.sha256}"'}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, body, headers, kind="cdn", repo=repo.repo_id, file=entry.path)
