"""A stand-in for the model hub on 127.0.0.1: the few calls huggingface_hub makes to download files.

`POST /api/models/<repo>/paths-info/<rev>` (sizes and hashes), `HEAD`/`GET <repo>/resolve/<rev>/<path>`
with the headers the client reads (X-Repo-Commit, ETag = the sha256 of large files, Content-Length,
Range for resuming) and the hub's error codes (X-Error-Code RepoNotFound / EntryNotFound / GatedRepo,
401 / 403 / 404). Files are bytes in memory; every request is recorded for the tests to inspect.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_FROM = 1024  # files from this size on are served as LFS files (sha256 etag), like the hub's large files


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Hub:
    repos: dict[str, dict[str, bytes]]
    token: str | None = None  # when set, requests without "Bearer <token>" get 401
    gated: set[str] = field(default_factory=set)
    cut_first_get: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the connection drops
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)


def make_handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            """Quiet: the tests read `hub.requests` instead."""

        def _refuse(self, status: int, code: str | None, body: bytes = b"{}") -> None:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _allowed(self, repo: str) -> bool:
            if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._refuse(401, "RepoNotFound" if repo in hub.repos else None)
                return False
            if repo not in hub.repos:
                self._refuse(404, "RepoNotFound")
                return False
            if repo in hub.gated:
                self._refuse(403, "GatedRepo")
                return False
            return True

        def do_POST(self):
            hub.requests.append(("POST", self.path, ""))
            m = re.fullmatch(r"/api/models/(.+?/.+?)/paths-info/([^/]+)", self.path)
            length = int(self.headers.get("Content-Length", 0))
            form = parse_qs(self.rfile.read(length).decode())
            if not m:
                return self._refuse(404, None)
            repo = m.group(1)
            if not self._allowed(repo):
                return
            rows = []
            for path in form.get("paths", []):
                data = hub.repos[repo].get(path)
                if data is None:
                    continue
                row = {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}
                if len(data) >= LFS_FROM:
                    row["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                rows.append(row)
            body = json.dumps(rows).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _resolve(self):
            rng = self.headers.get("Range", "")
            hub.requests.append((self.command, unquote(self.path), rng))
            m = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", unquote(self.path))
            if not m:
                return self._refuse(404, None)
            repo, path = m.group(1), m.group(3)
            if not self._allowed(repo):
                return
            data = hub.repos[repo].get(path)
            if data is None:
                return self._refuse(404, "EntryNotFound")
            start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
            part = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest() if len(data) >= LFS_FROM else git_oid(data)}"')
            self.send_header("Content-Length", str(len(part)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = hub.cut_first_get.pop(path, None)
            if cut is not None:  # the connection drops mid-file, once
                self.wfile.write(part[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(part)

        do_GET = _resolve
        do_HEAD = _resolve

    return Handler


class running:
    """`with running(hub) as url:` serves the hub on a free port of 127.0.0.1 for the block."""

    def __init__(self, hub: Hub):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
