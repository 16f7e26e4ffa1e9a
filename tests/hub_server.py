"""A loopback stand-in for the Hugging Face hub: serves repositories from local directories through
the endpoints `huggingface_hub.snapshot_download` and `HfApi.list_repo_files` call (repository
info, file tree, file resolve), and records which files were downloaded."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.downloaded: list[str] = []  # "org/name/path" of each file body sent
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                found = hub.route(path)
                if found is None:
                    self.send_error(404)
                    return
                data, headers = found
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)
                    if "/resolve/" in path:
                        hub.downloaded.append(path.split("/", 5)[-1])  # the path in the repo

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def route(self, path: str) -> tuple[bytes, dict[str, str]] | None:
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return None
            if parts[4] == "revision":
                info = {
                    "id": repo,
                    "sha": COMMIT,
                    "siblings": [{"rfilename": f} for f in self.files(repo)],
                }
                return json.dumps(info).encode(), {"Content-Type": "application/json"}
            if parts[4] == "tree":
                tree = [
                    {
                        "type": "file",
                        "path": f,
                        "size": (self.repos[repo] / f).stat().st_size,
                        "oid": hashlib.sha1((self.repos[repo] / f).read_bytes()).hexdigest(),
                    }
                    for f in self.files(repo)
                ]
                return json.dumps(tree).encode(), {"Content-Type": "application/json"}
            return None
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = "/".join(parts[:2])
            file = self.repos.get(repo, Path("/nonexistent")) / "/".join(parts[4:])
            if not file.is_file():
                return None
            data = file.read_bytes()
            etag = hashlib.sha1(data).hexdigest()
            return data, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
