"""fsspec URLs: a real S3-compatible server (moto) on 127.0.0.1, and ``memory://``.

The server is started once for the module and always stopped. Torn uploads are made by
failing the upload of one file (the only mock here: a fault injection).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

import torchkeep as tk

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bucket on a moto server; fsspec finds the endpoint through the environment."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    patch = pytest.MonkeyPatch()
    try:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"):
            patch.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        yield "s3://bucket"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        patch.undo()
        server.stop()


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "sharded"])
def test_save_load_inspect_on_s3(s3: str, name: str) -> None:
    model = net()
    url = f"{s3}/weights/{name}"
    shard = 100 if name == "sharded" else None
    assert tk.save(model, url, max_shard_size=shard) == url
    other = net()
    report = tk.load(other, url)
    assert report.ok and report.path == url and same(model, other)
    state = tk.load_state_dict(url, dtype=torch.float16)
    assert state["0.weight"].dtype == torch.float16
    info = tk.inspect(url)
    assert info.path == url and len(info.tensors) == 4


def test_inspect_reads_only_the_header_of_remote_safetensors(s3: str) -> None:
    url = f"{s3}/weights/big.safetensors"
    tk.save({"w": torch.zeros(256, 1024)}, url)
    with mock.patch("s3fs.S3FileSystem._get_file", side_effect=AssertionError("downloaded")):
        s3fs.S3FileSystem.clear_instance_cache()  # instances bind their methods when made
        info = tk.inspect(url)
        with pytest.raises(AssertionError, match="downloaded"):
            tk.load_state_dict(url)  # the patch does bite where data is needed
    s3fs.S3FileSystem.clear_instance_cache()
    assert info.tensors[0].shape == (256, 1024)
    assert info.size > 256 * 1024 * 4  # the real object's size


@pytest.mark.slow
def test_manager_on_s3_skips_a_torn_upload(s3: str) -> None:
    url = f"{s3}/runs/exp1"
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr = tk.CheckpointManager(url, keep_last=2, monitor="loss", max_shard_size=200)
    for step in (1, 2, 3):
        mgr.save(step, model=model, optimizer=optimizer, step=step, metrics={"loss": 1 / step})
    assert mgr.steps() == [2, 3] and mgr.best() == 3
    assert mgr.path(3) == f"{url}/step-00000003"

    real = s3fs.S3FileSystem._put_file
    calls: list[str] = []

    async def torn(self: Any, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(rpath)
        if len(calls) == 2:  # the connection drops during the second file of step 4
            raise ConnectionResetError(104, "connection reset by peer")
        return await real(self, lpath, rpath, *args, **kwargs)

    with mock.patch("s3fs.S3FileSystem._put_file", torn):
        s3fs.S3FileSystem.clear_instance_cache()  # instances bind their methods when made
        torn_mgr = tk.CheckpointManager(url, keep_last=2, monitor="loss", max_shard_size=200)
        with pytest.raises(tk.CheckpointWriteError, match="commit marker was not written"):
            torn_mgr.save(4, model=net(), step=4, metrics={"loss": 0.0})
    s3fs.S3FileSystem.clear_instance_cache()
    assert len(calls) == 2
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert fs.ls("bucket/runs/exp1/step-00000004")  # something was uploaded ...
    restarted = tk.CheckpointManager(url, keep_last=2, monitor="loss")
    assert restarted.steps() == [2, 3] and restarted.latest() == 3  # ... but not committed
    assert restarted.best() == 3

    fresh = net()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.0)
    assert restarted.restore(model=fresh, optimizer=fresh_opt) == {"step": 3}
    assert same(model, fresh) and fresh_opt.param_groups[0]["momentum"] == 0.9

    restarted.save(5, model=model, step=5)  # the next save removes the torn folder
    assert restarted.steps() == [3, 5]
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("bucket/runs/exp1")) == [
        "step-00000003",
        "step-00000005",
    ]
    assert tk.load(net(), f"{url}/step-00000005").ok  # weights straight from a step URL


def test_distributed_format_on_s3(s3: str) -> None:
    """A DCP checkpoint (one process here) written through fsspec, marker last."""
    url = f"{s3}/runs/dcp"
    model = net()
    mgr = tk.CheckpointManager(url, distributed=True, keep_last=1)
    mgr.save(1, model=model, epoch=1)
    mgr.save(2, model=model, epoch=2)
    assert mgr.steps() == [2]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert fs.isfile("bucket/runs/dcp/step-00000002/torchkeep-dcp.json")
    fs.rm_file("bucket/runs/dcp/step-00000002/torchkeep-dcp.json")  # as if rank 0 died
    assert tk.CheckpointManager(url).steps() == []
    fs.pipe_file("bucket/runs/dcp/step-00000002/torchkeep-dcp.json", b"")  # and a bad marker
    with pytest.raises(tk.CorruptFileError):
        tk.CheckpointManager(url, distributed=True).restore(model=net())


def test_memory_and_file_urls(tmp_path: Any) -> None:
    model = net()
    tk.save(model, "memory://tk-tests/m.safetensors")
    assert same(model, _loaded("memory://tk-tests/m.safetensors"))
    local = tmp_path / "m.safetensors"
    tk.save(model, f"file://{local}")
    assert local.is_file() and same(model, _loaded(f"file://{local}"))
    mgr = tk.CheckpointManager("memory://tk-tests/run", keep_last=1)
    mgr.save(1, model=model)
    mgr.save(2, model=model)
    assert mgr.steps() == [2] and same(model, _restored(mgr))


def _loaded(url: str) -> nn.Module:
    other = net()
    tk.load(other, url)
    return other


def _restored(mgr: tk.CheckpointManager) -> nn.Module:
    other = net()
    mgr.restore(model=other)
    return other


def test_every_reading_verb_takes_urls_and_hashes(tmp_path: Any) -> None:
    import hashlib

    from torchkeep.tools.convert import convert

    model = net()
    local = tmp_path / "m.safetensors"
    tk.save(model, local)
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    tk.save(model, "memory://tk-verbs/m.safetensors")
    tk.save_checkpoint("memory://tk-verbs/ckpt.pt", model=model, epoch=4, rng=False)
    linear = nn.Linear(4, 2)
    tk.save_model(linear, tmp_path / "rebuild.safetensors")
    # load_checkpoint: a URL, and a local file checked against its hash
    other = net()
    extra = tk.load_checkpoint("memory://tk-verbs/ckpt.pt", model=other)
    assert extra["epoch"] == 4 and same(model, other)
    with pytest.raises(tk.ChecksumError):
        tk.load_checkpoint(local, sha256="0" * 64)
    # load_model: a hash that matches, and one that does not
    rebuilt = tk.load_model(tmp_path / "rebuild.safetensors", sha256=None)
    assert torch.equal(rebuilt.weight, linear.weight)
    with pytest.raises(tk.ChecksumError):
        tk.load_model(tmp_path / "rebuild.safetensors", sha256="0" * 64)
    # convert: a URL in, a URL out, a hash on the source
    result = convert("memory://tk-verbs/m.safetensors", "memory://tk-verbs/out.pt")
    assert result.path == "memory://tk-verbs/out.pt"
    assert same(model, _loaded("memory://tk-verbs/out.pt"))
    convert(local, tmp_path / "checked.pt", sha256=digest)
    with pytest.raises(tk.ChecksumError):
        convert(local, tmp_path / "unchecked.pt", sha256="f" * 64)
    assert not (tmp_path / "unchecked.pt").exists()
    with pytest.warns(DeprecationWarning, match="max_shard_size"):
        convert(local, tmp_path / "shards", shard_size=10_000)


def test_every_writing_verb_writes_to_the_url_not_a_local_folder(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec

    monkeypatch.chdir(tmp_path)  # a verb that took the URL for a local path writes here
    linear = nn.Linear(4, 2)
    assert tk.save_model(linear, "memory://tk-writers/m.safetensors") == (
        "memory://tk-writers/m.safetensors"
    )
    tk.save_checkpoint("memory://tk-writers/ckpt", model=linear, epoch=1, rng=False)
    tk.save_checkpoint("memory://tk-writers/ckpt.pt", model=linear, epoch=2, rng=False)
    result = tk.export(linear, (torch.randn(1, 4),), "memory://tk-writers/m.pt2")
    assert result.path == "memory://tk-writers/m.pt2" and result.ok
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())
    names = {
        p.rsplit("/", 1)[-1] for p in fsspec.filesystem("memory").ls("/tk-writers", detail=False)
    }
    assert {"m.safetensors", "ckpt", "ckpt.pt", "m.pt2"} <= names
    assert torch.equal(tk.load_model("memory://tk-writers/m.safetensors").weight, linear.weight)
    assert tk.load_checkpoint("memory://tk-writers/ckpt")["epoch"] == 1
    assert tk.load_checkpoint("memory://tk-writers/ckpt.pt")["epoch"] == 2
    verified = tk.verify("memory://tk-writers/m.safetensors")
    assert verified.ok and verified.path == "memory://tk-writers/m.safetensors"


@pytest.mark.slow
def test_distributed_manager_on_s3_commits_its_marker_last(s3: str) -> None:
    """A DCP save at a URL: shards in place, the marker last; a failed save is never listed."""
    url = f"{s3}/runs/dcp"
    model = net()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    mgr = tk.CheckpointManager(url, distributed=True)
    mgr.save(1, model=model, optimizer=optimizer, epoch=1)
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert "torchkeep-dcp.json" in {p.rsplit("/", 1)[-1] for p in fs.ls(f"{url[5:]}/step-00000001")}

    real = s3fs.S3FileSystem._pipe_file

    async def refuse_marker(self: Any, path: str, data: bytes, *args: Any, **kwargs: Any) -> Any:
        if path.endswith("torchkeep-dcp.json"):
            raise ConnectionResetError(104, "connection reset by peer")
        return await real(self, path, data, *args, **kwargs)

    with mock.patch("s3fs.S3FileSystem._pipe_file", refuse_marker):
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(OSError):
            tk.CheckpointManager(url, distributed=True).save(2, model=net(), epoch=2)
    s3fs.S3FileSystem.clear_instance_cache()
    restarted = tk.CheckpointManager(url, distributed=True)
    assert restarted.steps() == [1]  # step 2's shards were written, its marker never was
    assert restarted.torn() == [f"{url}/step-00000002"]
    fresh = net()
    fresh_opt = torch.optim.Adam(fresh.parameters())
    assert restarted.restore(model=fresh, optimizer=fresh_opt) == {"epoch": 1}
    assert same(model, fresh)
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
