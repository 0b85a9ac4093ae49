"""The download stage's Hub code path, run for real against a fake Hub on 127.0.0.1.

The fake Hub serves a gated dataset repo, `acme/gated-rows`, holding one `train.jsonl` of Alpaca rows
at a fixed commit; every request without `Authorization: Bearer <token>` gets a 401, as a gated repo
answers. The download runs `scripts/download_dataset.py` (the rule's own script, through `run_stage`)
in a subprocess: huggingface_hub and datasets read HF_ENDPOINT, HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and
HF_HOME at import time into constants (`huggingface_hub.constants.ENDPOINT`, `.HF_HUB_OFFLINE`,
`.HF_TOKEN_PATH`, `datasets.config.HF_ENDPOINT`, `.HF_HUB_OFFLINE`, `.HF_DATASETS_CACHE`, ...), and this
test process imported them under conftest's offline settings.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import REPO
from workflow import HF_TOKEN

from sftpipe.io import read_jsonl

HUB_ID = "acme/gated-rows"
COMMIT = "5eed0fc0ffee5eed0fc0ffee5eed0fc0ffee5eed"  # what `main` points at on the fake Hub
ROWS = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "Good morning.", "output": "Bonjour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Give an antonym.", "input": "hot", "output": "cold"},
    {"instruction": "Spell it backwards.", "input": "abc", "output": "cba"},
]
FILES = {"train.jsonl": "".join(json.dumps(row) + "\n" for row in ROWS).encode()}
GATED = f"Access to dataset {HUB_ID} is restricted. You must have access to it and be authenticated to access it. Please log in."


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entry(path: str) -> dict:
    return {"type": "file", "oid": _git_oid(FILES[path]), "size": len(FILES[path]), "path": path}


@dataclass
class FakeHub:
    url: str
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Authorization)

    def authorizations(self, method: str, pattern: str) -> list[str | None]:
        return [auth for m, path, auth in self.requests if m == method and re.fullmatch(pattern, urlsplit(path).path)]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    repo_api = re.escape(f"/api/datasets/{HUB_ID}")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def reply(self, status: int, body: bytes | object = b"", headers: dict | None = None, ctype="application/json") -> None:
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def not_found(self, code: str = "EntryNotFound") -> None:
            self.reply(404, {"error": f"{code}: {self.path}"}, {"X-Error-Code": code, "X-Error-Message": code})

        def serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            auth = self.headers.get("Authorization")
            hub.requests.append((self.command, self.path, auth))
            path = unquote(urlsplit(self.path).path)
            if path == "/api/agent-harnesses":  # huggingface_hub's public, best-effort registry fetch
                return self.reply(200, {"standardEnvVars": [], "harnesses": {}})
            if auth != f"Bearer {HF_TOKEN}":
                return self.reply(401, {"error": GATED}, {"X-Error-Code": "GatedRepo", "X-Error-Message": GATED})
            if match := re.fullmatch(repo_api + r"(?:/revision/([^/]+))?", path):  # HfApi.dataset_info
                if match.group(1) not in (None, "main", COMMIT):
                    return self.not_found("RevisionNotFound")
                info = {
                    "_id": "fake", "id": HUB_ID, "author": "acme", "sha": COMMIT, "private": False, "gated": "auto",
                    "disabled": False, "downloads": 0, "likes": 0, "tags": [], "cardData": {},
                    "lastModified": "2024-01-01T00:00:00.000Z", "siblings": [{"rfilename": name} for name in FILES],
                }  # fmt: skip
                return self.reply(200, info, {"X-Repo-Commit": COMMIT})
            if match := re.fullmatch(repo_api + r"/tree/([^/]+)(/.*)?", path):  # HfFileSystem listing
                if match.group(1) not in ("main", COMMIT) or (match.group(2) or "/") != "/":
                    return self.not_found()
                return self.reply(200, [_entry(name) for name in FILES])
            if match := re.fullmatch(repo_api + r"/paths-info/([^/]+)", path):
                paths = json.loads(body).get("paths", []) if body.startswith(b"{") else []
                return self.reply(200, [_entry(p) for p in paths if p in FILES])
            if match := re.fullmatch(re.escape(f"/datasets/{HUB_ID}/resolve/") + r"([^/]+)/(.+)", path):
                if match.group(1) not in ("main", COMMIT) or match.group(2) not in FILES:
                    return self.not_found()
                return self.file(FILES[match.group(2)])
            return self.not_found()

        def file(self, data: bytes) -> None:
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_git_oid(data)}"', "Accept-Ranges": "bytes"}
            if match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start = int(match.group(1))
                end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self.reply(206, data[start : end + 1], headers, "application/octet-stream")
            return self.reply(200, data, headers, "application/octet-stream")

        do_GET = do_HEAD = do_POST = serve

    return Handler


@pytest.fixture
def fake_hub():
    hub = FakeHub(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# The rule's script, given the `snakemake` object Snakemake would inject.
RUNNER = """
import runpy, sys
from pathlib import Path
from types import SimpleNamespace as NS

work, repo = Path(sys.argv[1]), Path(sys.argv[2])
log = work / "results/logs/download_dataset/gated.log"
log.parent.mkdir(parents=True, exist_ok=True)
snakemake = NS(
    rule="download_dataset", threads=1, log=[str(log)], wildcards=NS(dataset="gated"),
    params=NS(dataset={"hub_id": "acme/gated-rows", "format": "alpaca", "limit": 3}, mirror_dir=None), config={},
    output=NS(rows=str(work / "results/data/raw/gated.jsonl"), manifest=str(work / "results/data/raw/gated.manifest.json")),
)
runpy.run_path(str(repo / "scripts/download_dataset.py"), init_globals={"snakemake": snakemake}, run_name="__main__")
"""


def _download(tmp_path: Path, hub: FakeHub, monkeypatch, token: str | None) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Run the download against `hub` with `token` as HF_TOKEN (none if None), with an empty HF_HOME,
    so no cached login token or dataset is found. Return (work dir, HF_HOME, the process); the
    process's stdout and stderr are also saved under the work dir."""
    work, hf_home = tmp_path / "work", tmp_path / "hf_home"
    work.mkdir()
    hf_home.mkdir()
    for name in list(os.environ):
        if name.startswith(("HF_", "HUGGING_FACE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(work), str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    (work / "stdout.txt").write_text(result.stdout)
    (work / "stderr.txt").write_text(result.stderr)
    return work, hf_home, result


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def test_gated_hub_download_uses_the_token_and_pins_the_commit(tmp_path, fake_hub, monkeypatch):
    work, hf_home, result = _download(tmp_path, fake_hub, monkeypatch, HF_TOKEN)
    assert result.returncode == 0, result.stderr[-4000:]
    raw = work / "results/data/raw/gated.jsonl"
    manifest = json.loads((work / "results/data/raw/gated.manifest.json").read_text())
    assert list(read_jsonl(raw)) == ROWS[:3]
    assert manifest["rows"] == 3
    # The revision is the commit `main` pointed at, which only the Hub's dataset_info knows.
    assert manifest["source"] == {"kind": "hub", "hub_id": HUB_ID, "config": None, "split": "train", "revision": COMMIT}

    # The token went to the Hub with the dataset_info call and with the file's download, and the
    # rows were read at the pinned commit.
    dataset_info = fake_hub.authorizations("GET", re.escape(f"/api/datasets/{HUB_ID}") + r"(/revision/.*)?")
    download = fake_hub.authorizations("GET", re.escape(f"/datasets/{HUB_ID}/resolve/{COMMIT}/train.jsonl"))
    assert dataset_info and download, fake_hub.requests
    assert set(dataset_info) | set(download) == {f"Bearer {HF_TOKEN}"}
    # Every request for the repo carried it: none was refused.
    assert all(auth == f"Bearer {HF_TOKEN}" for _, path, auth in fake_hub.requests if HUB_ID in path), fake_hub.requests

    # ...and it is written nowhere: not in the outputs, the rule's log, the process's output or the HF caches.
    written = _files(work) + _files(hf_home)
    assert {raw, work / "results/data/raw/gated.manifest.json", work / "results/logs/download_dataset/gated.log"} <= set(written)
    assert "dataset gated: 3 rows from hub" in (work / "results/logs/download_dataset/gated.log").read_text()
    leaks = [str(p) for p in written if HF_TOKEN.encode() in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"


def test_gated_hub_download_without_token_fails_and_writes_nothing(tmp_path, fake_hub, monkeypatch):
    work, _, result = _download(tmp_path, fake_hub, monkeypatch, None)
    assert result.returncode != 0
    # No output, not even a partial or temporary one, for Snakemake to take as done.
    raw_dir = work / "results/data/raw"
    assert not raw_dir.exists() or not any(raw_dir.iterdir()), list(raw_dir.iterdir())
    # The Hub refused the anonymous requests: no token from anywhere (HF_HOME is empty) was sent.
    repo_requests = [(m, path, auth) for m, path, auth in fake_hub.requests if HUB_ID in path]
    assert repo_requests and all(auth is None for _, _, auth in repo_requests), fake_hub.requests
    # What the user sees names the config key and what to do, without a traceback.
    assert f"sftpipe error in rule download_dataset: config key 'datasets.gated.hub_id': cannot read '{HUB_ID}'" in result.stderr
    assert "set HF_TOKEN" in result.stderr and "Traceback" not in result.stderr
