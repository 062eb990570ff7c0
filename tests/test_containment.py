"""Files that name other files: every name must stay inside its folder, every JSON bounded.

Real checkpoints (native folders, sharded folders, torch.distributed.checkpoint folders, the
download cache) are written, then tampered with: names that lead out through ``..``, absolute
paths and symlinks, an index naming an index, and JSON nested 100 000 levels deep. Each must be
refused with a typed error that describes nothing outside the folder, and ``verify`` must
refuse whatever a load refuses.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.formats.manifest import parse_manifest
from torchkeep.formats.safetensors_header import parse_header
from torchkeep.formats.sharded import parse_index
from torchkeep.safety import bounded_json as _json
from torchkeep.safety.contain import member
from torchkeep.storage.download import cached_path
from torchkeep.training.shards import _previous_shards

SECRET = b"TOPSECRET-" * 1234 + b"!"  # 12341 bytes: its size must never show in a message
DEEP = b"[" * 100_000 + b"]" * 100_000


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def assert_refused_quietly(
    load: Callable[[], object], error: type[BaseException] = tk.UnsafeFileError
) -> str:
    with pytest.raises(error) as caught:
        load()
    message = str(caught.value)
    assert str(len(SECRET)) not in message and "TOPSECRET" not in message
    return message


def assert_verify_refuses(path: Path) -> None:
    result = tk.verify(path)
    assert not result.ok, f"verify passed {path}, which a load refuses"
    assert all(str(len(SECRET)) not in p.message for p in result.problems)


# ------------------------------------------------------------------------ native checkpoints


def native(folder: Path) -> Path:
    model = net()
    tk.save_checkpoint(folder, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    return folder


def rename_file(folder: Path, new: str) -> None:
    manifest = json.loads((folder / "checkpoint.json").read_text())
    (old,) = manifest["files"]
    manifest["files"] = {new: manifest["files"][old]}
    for info in manifest["tensors"].values():
        info["file"] = new
    (folder / "checkpoint.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested"])
def test_native_manifest_naming_a_file_outside_is_refused(
    tmp_path: Path, secret: Path, kind: str
) -> None:
    folder = native(tmp_path / "ckpt")
    name = {"dotdot": "../outside/secret.bin", "absolute": str(secret), "nested": "a/../../x"}
    rename_file(folder, name[kind])
    message = assert_refused_quietly(lambda: tk.load_state_dict(folder, entry="model"))
    assert "outside its folder" in message
    assert_refused_quietly(lambda: tk.load_checkpoint(folder, model=net()))
    assert_verify_refuses(folder)
    with pytest.raises(tk.UnsafeFileError):
        parse_manifest((folder / "checkpoint.json").read_bytes(), path="checkpoint.json")


def test_native_shard_symlinked_out_of_the_folder_is_refused(tmp_path: Path, secret: Path) -> None:
    folder = native(tmp_path / "ckpt")
    (shard,) = folder.glob("*.safetensors")
    # A copy that would load, outside the folder, behind a symlink: still refused.
    moved = secret.parent / shard.name
    shutil.move(shard, moved)
    shard.symlink_to(moved)
    assert_refused_quietly(lambda: tk.load_state_dict(folder, entry="model"))
    assert_refused_quietly(lambda: tk.load_checkpoint(folder, model=net()))
    assert_verify_refuses(folder)


def test_symlink_inside_the_folder_is_followed(tmp_path: Path) -> None:
    folder = native(tmp_path / "ckpt")
    (shard,) = folder.glob("*.safetensors")
    (folder / "data").mkdir()
    shutil.move(shard, folder / "data" / shard.name)
    shard.symlink_to(Path("data") / shard.name)
    assert tk.load_state_dict(folder, entry="model")
    assert tk.verify(folder).ok


def test_previous_checkpoint_files_outside_are_never_linked(tmp_path: Path, secret: Path) -> None:
    folder = native(tmp_path / "ckpt")
    assert _previous_shards(folder)
    rename_file(folder, "../outside/secret.bin")
    assert _previous_shards(folder) == {}


# --------------------------------------------------------------------------- sharded folders


def sharded(folder: Path) -> Path:
    return tk.save(net(), folder, max_shard_size=100)


def set_shard(folder: Path, shard: str) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    data["weight_map"] = {k: shard if v == first else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "subfolder", "backslash"])
def test_index_naming_a_shard_outside_is_refused(tmp_path: Path, secret: Path, kind: str) -> None:
    folder = sharded(tmp_path / "model")
    shard = {
        "dotdot": "../outside/secret.bin",
        "absolute": str(secret),
        "subfolder": "sub/model.safetensors",
        "backslash": "..\\outside\\secret.bin",
    }[kind]
    set_shard(folder, shard)
    assert_refused_quietly(lambda: tk.load_state_dict(folder))
    assert_verify_refuses(folder)
    raw = (folder / "model.safetensors.index.json").read_bytes()
    with pytest.raises(tk.UnsafeFileError):
        parse_index(raw, path="model.safetensors.index.json")


def test_shard_symlinked_out_of_the_folder_is_refused(tmp_path: Path, secret: Path) -> None:
    folder = sharded(tmp_path / "model")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    moved = secret.parent / shard.name
    shutil.move(shard, moved)
    shard.symlink_to(moved)
    assert_refused_quietly(lambda: tk.load_state_dict(folder))
    assert_verify_refuses(folder)


def test_index_symlinked_out_of_the_folder_is_refused(tmp_path: Path, secret: Path) -> None:
    folder = sharded(tmp_path / "model")
    index = folder / "model.safetensors.index.json"
    moved = secret.parent / index.name
    shutil.move(index, moved)
    index.symlink_to(moved)
    assert_refused_quietly(lambda: tk.load_state_dict(folder))
    assert_verify_refuses(folder)


@pytest.mark.parametrize("kind", ["index", "index-behind-a-link", "folder", "itself"])
def test_index_naming_an_index_or_a_folder_is_refused(tmp_path: Path, kind: str) -> None:
    folder = sharded(tmp_path / "model")
    if kind == "index":
        (folder / "other.index.json").write_text(json.dumps({"weight_map": {}}))
        set_shard(folder, "other.index.json")
    elif kind == "index-behind-a-link":
        (folder / "loop.safetensors").symlink_to("model.safetensors.index.json")
        set_shard(folder, "loop.safetensors")
    elif kind == "folder":
        native(folder / "nested")
        set_shard(folder, "nested")
    else:
        set_shard(folder, "model.safetensors.index.json")
    with pytest.raises(tk.UnsafeFileError):
        tk.load_state_dict(folder)
    assert_verify_refuses(folder)


# ---------------------------------------------------------------------------- DCP folders


def dcp_folder(folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}, checkpoint_id=folder)
    return folder


def tamper_metadata(folder: Path, change: Callable[[object], None]) -> None:
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file, trusted
    for info in metadata.storage_data.values():
        change(info)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_dcp_storage_path_outside_is_refused(tmp_path: Path, secret: Path, kind: str) -> None:
    folder = dcp_folder(tmp_path / "dcp")
    name = "../outside/secret.bin" if kind == "dotdot" else str(secret)
    tamper_metadata(folder, lambda info: setattr(info, "relative_path", name))
    assert_refused_quietly(lambda: tk.load_state_dict(folder))
    assert_verify_refuses(folder)


def test_dcp_data_file_symlinked_out_is_refused(tmp_path: Path, secret: Path) -> None:
    folder = dcp_folder(tmp_path / "dcp")
    data = folder / "__0_0.distcp"
    moved = secret.parent / data.name
    shutil.move(data, moved)
    data.symlink_to(moved)
    assert_refused_quietly(lambda: tk.load_state_dict(folder))
    assert_verify_refuses(folder)


# --------------------------------------------------------------------------- download cache


def test_cache_file_names_stay_inside_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: Path
) -> None:
    monkeypatch.setenv("TORCHKEEP_CACHE", str(tmp_path / "cache"))
    root = (tmp_path / "cache" / "downloads").resolve()
    for url in (
        "http://127.0.0.1/%2E%2E",
        "http://127.0.0.1/a/..%2F..%2F..%2Fetc%2Fpasswd",
        "http://127.0.0.1/x%00y",
        "http://127.0.0.1/..%5C..%5Cwin",
        "http://127.0.0.1/.hidden",
    ):
        path = cached_path(url)
        assert path.is_relative_to(root) and path.parent.parent == root
        assert path.name not in ("..", ".") and "\x00" not in path.name
    # A cache folder that is a symlink out of the cache is not followed.
    url = "http://127.0.0.1/w.safetensors"
    entry = cached_path(url).parent
    entry.parent.mkdir(parents=True)
    entry.symlink_to(secret.parent)
    with pytest.raises(tk.UnsafeFileError):
        cached_path(url)


def test_member_refuses_every_way_out(tmp_path: Path, secret: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "in").write_bytes(b"x")
    (folder / "up").symlink_to("..")
    (folder / "abs").symlink_to(secret)
    (folder / "chain").symlink_to("up/outside")
    (folder / "self").symlink_to("self")
    for name in ("../x", "/etc/passwd", "up/outside/secret.bin", "abs", "chain/secret.bin", "self"):
        with pytest.raises(tk.UnsafeFileError):
            member(folder, name, path="m", what="file")
    assert member(folder, "in", path="m", what="file") == (folder / "in").resolve()


# -------------------------------------------------------------------------- bounded JSON


def deep_header() -> bytes:
    text = b'{"a":' + DEEP + b"}"
    return len(text).to_bytes(8, "little") + text


def write_deep_metadata(path: Path, key: str) -> None:
    tk.save(net(), path)
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"][key] = DEEP.decode()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])


def loader(path: Path) -> Callable[[], object]:
    return lambda: tk.load_state_dict(path)


def deep_cases(tmp_path: Path) -> dict[str, tuple[Path, Callable[[], object]]]:
    cases: dict[str, tuple[Path, Callable[[], object]]] = {}
    header = tmp_path / "header.safetensors"
    header.write_bytes(deep_header())
    cases["safetensors header"] = (header, lambda: tk.load_state_dict(header))
    for key in ("torchkeep.aliases", "torchkeep.xxh3", "torchkeep.model"):
        path = tmp_path / f"{key}.safetensors"
        write_deep_metadata(path, key)
        cases[key] = (path, loader(path))
    folder = sharded(tmp_path / "sharded")
    (folder / "model.safetensors.index.json").write_bytes(DEEP)
    cases["index.json"] = (folder, lambda: tk.load_state_dict(folder))
    ckpt = native(tmp_path / "native")
    (ckpt / "checkpoint.json").write_bytes(DEEP)
    cases["checkpoint.json"] = (ckpt, lambda: tk.load_checkpoint(ckpt, model=net()))
    return cases


def test_deep_json_is_refused_everywhere_without_recursion(tmp_path: Path) -> None:
    for path, load in deep_cases(tmp_path).values():
        with pytest.raises(tk.CorruptFileError, match="levels deep"):
            load()
        assert_verify_refuses(path)
    with pytest.raises(tk.CorruptFileError, match="levels deep"):
        parse_header(deep_header(), path="x", file_size=len(deep_header()))
    with pytest.raises(tk.CorruptFileError, match="levels deep"):
        parse_index(DEEP, path="x.index.json")
    with pytest.raises(tk.CorruptFileError, match="levels deep"):
        parse_manifest(DEEP, path="checkpoint.json")


def test_deep_dcp_marker_and_manager_marker(tmp_path: Path) -> None:
    from torchkeep.formats.dcp_io import MARKER, read_marker

    folder = dcp_folder(tmp_path / "run" / "step-00000001")
    (folder / MARKER).write_bytes(DEEP)
    with pytest.raises(tk.CorruptFileError, match="levels deep"):
        read_marker(folder)
    with pytest.raises(tk.CorruptFileError, match="levels deep"):
        tk.load_state_dict(folder)
    manager = tk.CheckpointManager(tmp_path / "run")
    with pytest.raises(tk.CorruptFileError, match="levels deep"):
        manager.restore(model=net())


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b'{"a": 1, "a": 2}', "twice"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": -Infinity}', "Infinity"),
        (b'{"a": 1e400}', "out of range"),
        ('{"a": 1}'.encode("utf-16"), "UTF-8"),
        (b'\xef\xbb\xbf{"a": 1}', "byte-order mark"),
        (b'{"a": "\xff"}', "UTF-8"),
        (b'{"a": "\\ud800"}', "surrogate"),
        (b'{"a": 1} x', "not valid JSON"),
        (b"[" * 65 + b"]" * 65, "levels deep"),
        (b'"' + b"x" * 300 + b'"', "over the limit"),
    ],
)
def test_bounded_json_refusals(data: bytes, problem: str) -> None:
    with pytest.raises(tk.CorruptFileError, match=problem) as caught:
        _json.loads(data, path="f.json", what="index.json", max_bytes=200)
    assert "'f.json'" in str(caught.value) and "index.json" in str(caught.value)


def test_bounded_json_ignores_brackets_in_strings() -> None:
    text = json.dumps({"k": "[" * 1000, "e": '\\"[[[[', "n": [[1]]}).encode()
    assert _json.depth(text) == 3
    assert _json.loads(text, path="f", what="x")["n"] == [[1]]
