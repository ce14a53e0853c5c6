"""A small Hub-API server on 127.0.0.1 for tests: just what the real `huggingface_hub` (2.x) client calls to push
and download a model repo. No Hub is reachable here, so `push_adapter` and `load_adapter("user/repo")` are tested
with the real client doing real HTTP against this server.

Routes (as the client builds them in hf_api.py, _commit_api.py, file_download.py):
  GET  /api/whoami-v2                                   token check
  POST /api/repos/create                                {"name", "organization", "private"} → {"url"}; 409 if it exists
  POST /api/validate-yaml                               README.md metadata check → no errors
  POST /api/models/{repo}/branch/{branch}               branch from main; 409 if it exists
  POST /api/models/{repo}/preupload/{rev}               every file "regular" (inline base64 in the commit, no LFS)
  POST /api/models/{repo}/commit/{rev}                  NDJSON: header + file ops → {"commitUrl", "commitOid"}
  GET  /api/models/{repo}[/revision/{rev}]              {"id", "sha", "siblings", "private"}
  GET  /api/models/{repo}/tree/{rev}                    [{"type": "file", "path", "size", "oid"}]
  HEAD/GET /{repo}/resolve/{rev}/{path}                 X-Repo-Commit, ETag, Content-Length (+ body on GET)
Writes need `Authorization: Bearer hf_test…` (else 401); `fail = (status, substring)` makes matching requests fail;
`hang_s` stalls every request (an endpoint that accepts connections but does not answer); `stall` (a substring of
"METHOD path") stalls the matching requests until the server closes, unanswered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

VALID_TOKEN_PREFIX = "hf_test"
API = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/(revision|tree|preupload|commit|branch)/([^/]+)(/.*)?)?$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubState:
    """Repos as commits of {path: bytes}; branches point at commit shas."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, dict] = {}
        self.fail: tuple[int, str] | None = None  # (status, substring of "METHOD path") to fail
        self.hang_s = 0.0  # seconds to stall every request before closing it unanswered
        self.stall: str | None = None  # substring of "METHOD path" whose requests never get an answer
        self.closed = threading.Event()  # releases stalled requests when the server closes
        self.requests: list[str] = []

    def commit(self, repo_id: str, parent: str | None, files: dict[str, bytes], message: str) -> str:
        repo = self.repos[repo_id]
        tree = dict(repo["commits"][parent]) if parent else {}
        tree.update(files)
        sha = hashlib.sha1(
            f"{parent}:{message}:{len(repo['commits'])}".encode() + b"".join(files.values())
        ).hexdigest()
        repo["commits"][sha] = tree
        return sha


class Handler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.send_response(status)
        if isinstance(body, (dict, list)):
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer ") :].startswith(VALID_TOKEN_PREFIX)

    def _body(self) -> bytes:
        return self.body

    def _resolve(self, repo_id: str, rev: str) -> str | None:
        repo = self.server.state.repos[repo_id]
        rev = unquote(rev)
        return repo["branches"].get(rev) or (rev if rev in repo["commits"] else None)

    def _dispatch(self) -> None:
        state = self.server.state
        # Read the body before any answer: closing a socket with unread data resets it, and the client would
        # report a network error instead of the status this server means to send.
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = unquote(urlsplit(self.path).path)
        state.requests.append(f"{self.command} {path}")
        if state.hang_s:  # a server that accepts the connection and never answers in time
            time.sleep(state.hang_s)
            return
        if state.stall and state.stall in f"{self.command} {path}":
            state.closed.wait(30)
            return
        if state.fail and state.fail[1] in f"{self.command} {path}":
            return self._error(state.fail[0], f"Simulated failure {state.fail[0]}")
        with state.lock:
            if path == "/api/whoami-v2":
                return self._send(200, {"name": "user", "type": "user"}) if self._authorized() else self._unauth()
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                return self._create_repo()
            if match := API.match(path):
                return self._api(*match.groups())
            if match := RESOLVE.match(path):
                return self._file(*match.groups())
        return self._error(404, f"No route for {self.command} {path}")

    def _unauth(self) -> None:
        self._error(401, "Invalid credentials in Authorization header")

    do_GET = do_HEAD = do_POST = _dispatch

    # -- routes --------------------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        if not self._authorized():
            return self._unauth()
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.server.state.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self.server.state.repos[repo_id] = {"private": private, "commits": {}, "branches": {}}
        sha = self.server.state.commit(repo_id, None, {".gitattributes": b"*.safetensors filter=lfs\n"}, "init")
        self.server.state.repos[repo_id]["branches"]["main"] = sha
        self._send(200, {"url": url, "name": repo_id})

    def _api(self, repo_id: str, action: str | None, rev: str | None, sub: str | None) -> None:
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo["private"] and not self._authorized()):
            return self._error(404, "Repository not found", "RepoNotFound")
        if self.command == "POST" and not self._authorized():
            return self._unauth()
        sha = self._resolve(repo_id, rev or "main")
        if action == "branch":
            if unquote(rev) in repo["branches"]:
                return self._error(409, "Reference already exists")
            repo["branches"][unquote(rev)] = repo["branches"]["main"]
            return self._send(200, {})
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if action == "preupload":
            files = json.loads(self._body())["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})  # fmt: skip
        if action == "commit":
            return self._commit(repo_id, rev, sha)
        tree = repo["commits"][sha]
        if action == "tree":
            return self._send(200, [{"type": "file", "path": p, "size": len(c), "oid": git_blob_sha(c)}
                                    for p, c in sorted(tree.items())])  # fmt: skip
        self._send(200, {"id": repo_id, "sha": sha, "private": repo["private"],
                         "siblings": [{"rfilename": p} for p in sorted(tree)]})  # fmt: skip

    def _commit(self, repo_id: str, rev: str, parent: str) -> None:
        files, message = {}, "commit"
        for line in self._body().splitlines():
            op = json.loads(line)
            if op["key"] == "header":
                message = op["value"]["summary"]
            elif op["key"] == "file":
                files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            else:
                return self._error(400, f"Unsupported commit operation {op['key']!r} (this server is regular-only)")
        sha = self.server.state.commit(repo_id, parent, files, message)
        self.server.state.repos[repo_id]["branches"][unquote(rev)] = sha
        self._send(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha})

    def _file(self, repo_id: str, rev: str, file: str) -> None:
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo["private"] and not self._authorized()):
            return self._error(404, "Repository not found", "RepoNotFound")
        sha = self._resolve(repo_id, rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        content = repo["commits"][sha].get(file)
        if content is None:
            return self._error(404, f"Entry not found: {file}", "EntryNotFound")
        self._send(200, content, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(content)}"'})


class HubServer(ThreadingHTTPServer):
    """`with HubServer() as hub:` serves on `hub.url` in a thread until the block ends."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.closed.set()
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
