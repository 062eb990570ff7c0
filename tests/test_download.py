"""Pretrained weights from an HTTP URL, served by an http.server on 127.0.0.1.

The server serves files from a folder and can be told to break: send a byte less than it
promised and close the connection, or send different bytes.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.storage.download import cached_path


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.folder = folder
        self.requests: list[str] = []
        self.truncate = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        file = self.server.folder / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.server.truncate:
            self.wfile.write(data[: len(data) // 2])  # then the connection closes
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("TORCHKEEP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "served"
    folder.mkdir()
    started = Server(folder)
    thread = threading.Thread(target=started.serve_forever, daemon=True)
    thread.start()
    try:
        yield started
    finally:
        started.shutdown()
        started.server_close()
        thread.join(5)


def publish(server: Server, name: str, model: nn.Module) -> tuple[str, str]:
    path = server.folder / name
    tk.save(model, path)
    return f"{server.url}/{name}", hashlib.sha256(path.read_bytes()).hexdigest()


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_downloads_once_into_the_cache_and_loads(server: Server, tmp_path: Path) -> None:
    model = net()
    url, digest = publish(server, "weights.safetensors", model)
    other = net()
    report = tk.load(other, url, sha256=digest)
    assert report.ok and report.path == url
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True)
    )
    cached = cached_path(url)
    assert cached.is_file() and str(cached).startswith(str(tmp_path / "cache"))
    state = tk.load_state_dict(url, dtype=torch.bfloat16)  # from the cache
    assert state["0.weight"].dtype == torch.bfloat16
    assert server.requests == ["/weights.safetensors"]


def test_torch_hub_style_hash_prefix_in_the_name(server: Server) -> None:
    model = net()
    path = server.folder / "tmp.pth"
    tk.save(model, path)
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    path.rename(server.folder / f"net-{prefix}.pth")
    assert tk.load(net(), f"{server.url}/net-{prefix}.pth", check_hash=True).ok
    (server.folder / "net-00000000.pth").write_bytes(
        (server.folder / f"net-{prefix}.pth").read_bytes()
    )
    with pytest.raises(tk.ChecksumError):
        tk.load(net(), f"{server.url}/net-00000000.pth", check_hash=True)
    with pytest.raises(ValueError, match="hash prefix"):
        tk.load_state_dict(f"{server.url}/plain.pth", check_hash=True)


def test_hash_mismatch_caches_nothing(server: Server) -> None:
    url, digest = publish(server, "weights.safetensors", net())
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(tk.ChecksumError, match="nothing was cached|not cached"):
        tk.load_state_dict(url, sha256=wrong)
    folder = cached_path(url).parent
    assert not any(folder.iterdir())  # no file, complete-looking or partial
    assert tk.load_state_dict(url, sha256=digest)  # a right hash downloads again


def test_interrupted_download_never_looks_complete(server: Server) -> None:
    url, _ = publish(server, "weights.safetensors", net())
    server.truncate = True
    with pytest.raises(tk.DownloadError, match="nothing was cached"):
        tk.load(net(), url)
    folder = cached_path(url).parent
    assert not any(folder.iterdir())
    server.truncate = False
    assert tk.load(net(), url).ok
    assert len(server.requests) == 2


def test_missing_url_is_a_download_error(server: Server) -> None:
    with pytest.raises(tk.DownloadError, match="404"):
        tk.load_state_dict(f"{server.url}/nope.safetensors")
    with pytest.raises(ConnectionError):  # callers that do not know torchkeep
        tk.load_state_dict(f"{server.url}/nope.safetensors")


def test_sha256_checks_local_files_too(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tk.save(net(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert tk.load_state_dict(path, sha256=digest[:12])
    with pytest.raises(tk.ChecksumError):
        tk.load_state_dict(path, sha256="f" * 64)
