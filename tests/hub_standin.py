"""A stand-in for the model hub on 127.0.0.1: the few calls huggingface_hub makes to download and upload files.

Downloads: `POST /api/models/<repo>/paths-info/<rev>` (sizes and hashes), `GET /api/models/<repo>/tree/<rev>[/dir]`
(a folder's files), `HEAD`/`GET <repo>/resolve/<rev>/<path>` with the headers the client reads (X-Repo-Commit,
ETag = the sha256 of large files, Content-Length, Range for resuming) and the hub's error codes (X-Error-Code
RepoNotFound / EntryNotFound / GatedRepo, 401 / 403 / 404).

Uploads, as huggingface_hub's `create_repo` + `create_commit` make them without Xet (the stand-in offers only the
"basic" LFS transfer; a client with hf_xet installed must run with HF_HUB_DISABLE_XET): `POST /api/repos/create`
(409 when it exists), `POST /api/validate-yaml` (a README's front matter), `POST /api/models/<repo>/preupload/<rev>`
(which files go as LFS objects: the large ones that are not text, like the hub's .gitattributes), the LFS batch
`POST /<repo>.git/info/lfs/objects/batch` (an upload PUT and a verify href on the stand-in, none for an object it
holds), `PUT /lfs/<oid>`, `POST /lfs/verify`, and `POST /api/models/<repo>/commit/<rev>`: NDJSON lines, a header,
`file` (base64 content), `lfsFile` (an object uploaded before) and `deletedFile` (404 EntryNotFound for a file
the repository does not have, as the hub answers), applied all or nothing; and
`GET /api/models/<repo>[/revision/<rev>]`, which a commit that changes nothing asks for.

Files are bytes in memory; every request is recorded for the tests to inspect, and every commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_FROM = 1024  # files from this size on are served as LFS files (sha256 etag), like the hub's large files
TEXT = (".md", ".json", ".txt", ".yaml", ".toml")  # ... unless they are text, which the hub keeps in git


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    return size >= LFS_FROM and not path.endswith(TEXT)


@dataclass
class Hub:
    repos: dict[str, dict[str, bytes]]
    token: str | None = None  # when set, requests without "Bearer <token>" get 401
    gated: set[str] = field(default_factory=set)
    cut_first_get: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the connection drops
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    lfs: dict[str, bytes] = field(default_factory=dict)  # LFS objects uploaded, by sha256
    commits: list[dict] = field(default_factory=list)  # {"repo", "summary", "files": {path: bytes}, "deleted": [...]}
    private: dict[str, bool] = field(default_factory=dict)  # repositories created here, and whether private
    drop_puts: dict[str, int] = field(default_factory=dict)  # sha256 -> uploads of it cut off mid-body (then taken)
    refuse_writes: int = 0  # an HTTP status every write gets (403: a read-only token), 0 = none
    stall_s: float = 0.0  # a pause before each commit is answered (a slow link)


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

        def _json(self, value, status: int = 200) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _writable(self, repo: str) -> bool:
            """A write to `repo`: the token, the repository, then a refusal of writes the test asked for."""
            if not self._allowed(repo):
                return False
            if hub.refuse_writes:
                self._refuse(hub.refuse_writes, None, b'{"error": "You do not have write access"}')
                return False
            return True

        def do_POST(self):
            hub.requests.append(("POST", self.path, ""))
            path = self.path.split("?")[0]
            for pattern, route in ((r"/api/repos/create", self._create), (r"/api/validate-yaml", self._validate_yaml),
                                   (r"/api/models/(.+?/.+?)/preupload/([^/]+)", self._preupload),
                                   (r"/(.+?/.+?)\.git/info/lfs/objects/batch", self._lfs_batch),
                                   (r"/lfs/verify", self._lfs_verify),
                                   (r"/api/models/(.+?/.+?)/commit/([^/]+)", self._commit)):
                m = re.fullmatch(pattern, unquote(path))
                if m:
                    return route(*m.groups())
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
                if is_lfs(path, len(data)):
                    row["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                rows.append(row)
            body = json.dumps(rows).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _create(self):
            request = json.loads(self._body())
            repo = f"{request.get('organization')}/{request['name']}"
            if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._refuse(401, None, b'{"error": "Invalid credentials in Authorization header"}')
            if hub.refuse_writes:
                return self._refuse(hub.refuse_writes, None, b'{"error": "You do not have write access"}')
            if repo in hub.repos:
                return self._json({"error": "You already created this model repo", "url": f"http://{self.headers['Host']}/{repo}"}, 409)
            hub.repos[repo] = {}
            hub.private[repo] = request.get("visibility") == "private" or bool(request.get("private"))
            self._json({"url": f"http://{self.headers['Host']}/{repo}", "name": repo})

        def _validate_yaml(self):
            import yaml

            content = json.loads(self._body())["content"]
            front = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
            try:
                yaml.safe_load(front.group(1) if front else "")
            except yaml.YAMLError as e:
                return self._json({"errors": [{"message": str(e)}]}, 400)
            self._json({"warnings": []} if front else {"warnings": [{"message": "empty or missing yaml metadata"}]})

        def _preupload(self, repo: str, revision: str):
            request = json.loads(self._body())
            if not self._writable(repo):
                return
            rows = []
            for f in request["files"]:
                have = hub.repos[repo].get(f["path"])
                lfs = is_lfs(f["path"], f["size"])
                oid = None if have is None else hashlib.sha256(have).hexdigest() if lfs else git_oid(have)
                rows.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                             "oid": oid})
            self._json({"files": rows, "commitOid": COMMIT})

        def _lfs_batch(self, repo: str):
            request = json.loads(self._body())
            if not self._writable(repo):
                return
            base = f"http://{self.headers['Host']}"
            objects = []
            for o in request["objects"]:
                row = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in hub.lfs:  # an object the hub holds is not sent again
                    row["actions"] = {"upload": {"href": f"{base}/lfs/{o['oid']}"},
                                      "verify": {"href": f"{base}/lfs/verify"}}
                objects.append(row)
            self._json({"transfer": "basic", "objects": objects})

        def do_PUT(self):
            hub.requests.append(("PUT", self.path, ""))
            m = re.fullmatch(r"/lfs/([0-9a-f]{64})", self.path)
            if not m:
                return self._refuse(404, None)
            oid, length = m.group(1), int(self.headers.get("Content-Length", 0))
            if hub.drop_puts.get(oid, 0) > 0:  # the connection drops mid-upload
                hub.drop_puts[oid] -= 1
                self.rfile.read(length // 2)
                self.close_connection = True
                return
            data = self.rfile.read(length)
            if hashlib.sha256(data).hexdigest() != oid:
                return self._refuse(400, None, b'{"error": "content does not match its oid"}')
            hub.lfs[oid] = data
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _lfs_verify(self):
            request = json.loads(self._body())
            held = hub.lfs.get(request["oid"])
            if held is None or len(held) != request["size"]:
                return self._refuse(404, None, b'{"error": "object not found"}')
            self._json({"message": "ok"})

        def _commit(self, repo: str, revision: str):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not self._writable(repo):
                return
            time.sleep(hub.stall_s)
            header, files, deleted = lines[0]["value"], {}, []
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._json({"error": f"LFS object {value['oid']} was never uploaded"}, 422)
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif line["key"] == "deletedFile":
                    if value["path"] not in hub.repos[repo]:  # as the hub answers, and nothing is applied
                        return self._refuse(404, "EntryNotFound", b'{"error": "A file with this name doesn\'t exist"}')
                    deleted.append(value["path"])
            for path in deleted:
                del hub.repos[repo][path]
            hub.repos[repo].update(files)
            hub.commits.append({"repo": repo, "summary": header["summary"], "files": files, "deleted": deleted})
            oid = hashlib.sha1(json.dumps(len(hub.commits)).encode()).hexdigest()
            self._json({"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}", "commitOid": oid,
                        "pullRequestUrl": None})

        def _tree(self):
            hub.requests.append(("GET", unquote(self.path), ""))
            m = re.fullmatch(r"/api/models/(.+?/.+?)/tree/([^/]+)(?:/(.+))?", unquote(self.path.split("?")[0]))
            repo, folder = m.group(1), m.group(3)
            if not self._allowed(repo):
                return
            recursive = "recursive=True" in self.path or "recursive=true" in self.path
            rows = []
            for path, data in sorted(hub.repos[repo].items()):
                rest = path[len(folder) + 1:] if folder else path
                if (folder and not path.startswith(folder + "/")) or ("/" in rest and not recursive):
                    continue
                row = {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}
                if is_lfs(path, len(data)):
                    row["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                rows.append(row)
            if folder and not rows:
                return self._refuse(404, "EntryNotFound")
            self._json(rows)

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
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest() if is_lfs(path, len(data)) else git_oid(data)}"')
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

        def do_GET(self):
            if re.match(r"/api/models/.+?/.+?/tree/", self.path):
                return self._tree()
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", self.path.split("?")[0])
            if m:  # the repository's information (a commit that changes nothing asks for it)
                hub.requests.append(("GET", self.path, ""))
                if self._allowed(m.group(1)):
                    self._json({"id": m.group(1), "sha": COMMIT, "private": hub.private.get(m.group(1), False),
                                "siblings": [{"rfilename": p} for p in sorted(hub.repos[m.group(1)])]})
                return
            return self._resolve()

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
