"""Integrity: the safetensors header parser against the reference library, typed errors from
every reader, ``verify`` agreeing with ``load``, and the download cache checked on every hit.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file
from test_download import Server, net, publish
from test_download import server as server  # the fixture

import torchkeep as tk
from torchkeep.formats._base import OpenOptions
from torchkeep.formats.registry import SAFETENSORS, open_format
from torchkeep.formats.safetensors_header import parse_header
from torchkeep.storage.download import cached_path

# ------------------------------------------------------------- safetensors vs the reference

F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def raw_file(header: bytes | str | dict[str, object], data: bytes = b"") -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + data


HANDWRITTEN: dict[str, bytes] = {
    "valid": raw_file({"a": F32_1}, b"\0" * 4),
    "zero-size huge dims": raw_file(
        {"a": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}
    ),
    "overflow before a zero": raw_file(
        {"a": {"dtype": "F32", "shape": [2**62, 8, 0], "data_offsets": [0, 0]}}
    ),
    "dim over u64": raw_file({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}),
    "dim over int64": raw_file(
        {"a": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}
    ),
    "boolean offset": raw_file({"a": {**F32_1, "data_offsets": [False, 4]}}, b"\0" * 4),
    "boolean dim": raw_file({"a": {**F32_1, "shape": [True]}}, b"\0" * 4),
    "float dim": raw_file('{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', b"\0" * 4),
    "negative zero dim": raw_file('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'),
    "negative offset": raw_file({"a": {**F32_1, "data_offsets": [-4, 0]}}, b"\0" * 4),
    "utf-16 header": raw_file(json.dumps({"a": F32_1}).encode("utf-16"), b"\0" * 4),
    "latin-1 name": raw_file(
        b'{"\xe9":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4
    ),
    "lone surrogate": raw_file(
        '{"__metadata__":{"x":"\\ud800"},"a":' + json.dumps(F32_1) + "}", b"\0" * 4
    ),
    "metadata list": raw_file({"__metadata__": [], "a": F32_1}, b"\0" * 4),
    "metadata int value": raw_file({"__metadata__": {"x": 1}, "a": F32_1}, b"\0" * 4),
    "metadata false": raw_file({"__metadata__": False, "a": F32_1}, b"\0" * 4),
    "metadata empty string": raw_file({"__metadata__": "", "a": F32_1}, b"\0" * 4),
    "three offsets": raw_file({"a": {**F32_1, "data_offsets": [0, 4, 4]}}, b"\0" * 4),
    "lowercase dtype": raw_file({"a": {**F32_1, "dtype": "f32"}}, b"\0" * 4),
    "gap": raw_file({"a": {**F32_1, "data_offsets": [4, 8]}}, b"\0" * 8),
    "overlap": raw_file({"a": F32_1, "b": {**F32_1, "data_offsets": [2, 6]}}, b"\0" * 8),
    "trailing bytes": raw_file({"a": F32_1}, b"\0" * 5),
    "truncated data": raw_file({"a": F32_1}, b"\0" * 3),
    "length past the end": struct.pack("<Q", 1 << 40) + b'{"a":1}',
    "header not an object": raw_file(b"[1, 2]"),
    "nan": raw_file(b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', b"\0" * 4),
    "huge number": raw_file(
        b'{"a":{"dtype":"F32","shape":[1e999],"data_offsets":[0,4]}}', b"\0" * 4
    ),
    "entry not an object": raw_file({"a": [1]}),
    "missing shape": raw_file({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4),
}


def reference_refuses(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            list(f.keys())
        load_file(str(path))
    except Exception:
        return True
    return False


def torchkeep_refuses(path: Path) -> bool:
    """Parse, load and verify: all three must agree."""
    data = path.read_bytes()
    try:
        parse_header(data, path=str(path), file_size=len(data))
        parsed = True
    except tk.CorruptFileError:
        parsed = False
    try:
        tk.load_state_dict(path)
        loaded = True
    except (tk.CorruptFileError, tk.UnknownFormatError):
        loaded = False
    verified = tk.verify(path).ok
    # A file that does not look like safetensors at all is not parsed by load.
    assert loaded == verified, f"load and verify disagree on {path.name}"
    assert not loaded or parsed
    return not loaded


@pytest.mark.parametrize("name", sorted(HANDWRITTEN))
def test_refuses_what_the_safetensors_library_refuses(tmp_path: Path, name: str) -> None:
    path = tmp_path / "f.safetensors"
    path.write_bytes(HANDWRITTEN[name])
    if reference_refuses(path):
        assert torchkeep_refuses(path), f"{name}: the reference refuses it, torchkeep loads it"
    elif name == "valid":
        assert not torchkeep_refuses(path)


def mutations(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
    }
    data = b"".join(t.numpy().tobytes() for t in tensors.values())
    replacements: list[object] = [
        True,
        False,
        None,
        -1,
        0,
        1,
        2**63,
        2**64,
        1.5,
        "x",
        [],
        {},
        [0],
        [2**62, 0],
        "F32",
    ]
    for _ in range(count):
        mutated = json.loads(json.dumps(header))
        name = rng.choice(["a", "b", "__metadata__"])
        if name == "__metadata__":
            mutated[name] = rng.choice(replacements)
        else:
            field = rng.choice(["dtype", "shape", "data_offsets"])
            value = rng.choice(replacements)
            if isinstance(mutated[name][field], list) and rng.random() < 0.5:
                mutated[name][field][rng.randrange(len(mutated[name][field]))] = value
            else:
                mutated[name][field] = value
        text = json.dumps(mutated, separators=(",", ":")).encode()
        yield raw_file(text, data[: rng.choice([len(data), len(data), len(data) - 1])])


def test_random_header_mutations_against_the_reference(tmp_path: Path) -> None:
    refused = 0
    for number, data in enumerate(mutations(seed=1234, count=150)):
        path = tmp_path / f"m{number}.safetensors"
        path.write_bytes(data)
        if reference_refuses(path):
            refused += 1
            assert torchkeep_refuses(path), f"mutation {number}: {data[8:200]!r}"
    assert refused > 50  # the mutations do exercise refusals


# -------------------------------------------------------------------------- typed failures


def test_the_registry_turns_any_parser_failure_into_a_corrupt_file_error(tmp_path: Path) -> None:
    class Broken:
        name = "broken"
        suffixes = ()
        is_folder = False

        def __init__(self, error: BaseException) -> None:
            self.error = error

        def sniff(self, path: Path, head: bytes) -> bool:
            return True

        def open(self, path: Path, options: OpenOptions) -> tk.CorruptFileError:
            raise self.error

        def write(self, request: object, path: Path) -> None:
            raise NotImplementedError

    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    for error in (
        KeyError("k"),
        struct.error("bad"),
        RecursionError(),
        AssertionError(),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
        IsADirectoryError(21, "is a folder"),
    ):
        with pytest.raises(tk.CorruptFileError, match="cannot read") as caught:
            open_format(path, Broken(error), OpenOptions())  # type: ignore[arg-type]
        assert caught.value.__cause__ is error and str(path) in str(caught.value)
    for passing in (FileNotFoundError(2, "gone"), PermissionError(13, "no"), tk.DeviceError("x")):
        with pytest.raises(type(passing)):
            open_format(path, Broken(passing), OpenOptions())  # type: ignore[arg-type]


def dcp_folder(folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}, checkpoint_id=folder)
    return folder


def rewrite_metadata(folder: Path, change: Callable[[object], None]) -> None:
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file, trusted
    change(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def set_all(attribute: str, value: object) -> Callable[[object], None]:
    def change(metadata: object) -> None:
        for info in metadata.storage_data.values():  # type: ignore[attr-defined]
            setattr(info, attribute, value)

    return change


def drop_a_chunk(metadata: object) -> None:
    item = metadata.state_dict_metadata["w"]  # type: ignore[attr-defined]
    item.size = torch.Size([4, 3])  # the one chunk now covers half of it


DCP_DAMAGE: dict[str, Callable[[Path], None]] = {
    "short data file": lambda f: (f / "__0_0.distcp").write_bytes(
        (f / "__0_0.distcp").read_bytes()[:-100]
    ),
    "data file missing": lambda f: (f / "__0_0.distcp").unlink(),
    "garbage data": lambda f: (f / "__0_0.distcp").write_bytes(
        b"\0" * len((f / "__0_0.distcp").read_bytes())
    ),
    "metadata garbage": lambda f: (f / ".metadata").write_bytes(b"\x80\x04garbage"),
    "boolean offset": lambda f: rewrite_metadata(f, set_all("offset", True)),
    "negative length": lambda f: rewrite_metadata(f, set_all("length", -1)),
    "length too short": lambda f: rewrite_metadata(f, set_all("length", 3)),
    "path not a string": lambda f: rewrite_metadata(f, set_all("relative_path", 7)),
    "uncovered region": lambda f: rewrite_metadata(f, drop_a_chunk),
}


@pytest.mark.parametrize("damage", sorted(DCP_DAMAGE))
def test_damaged_dcp_folders_fail_typed_in_load_and_verify(tmp_path: Path, damage: str) -> None:
    folder = dcp_folder(tmp_path / "dcp")
    assert tk.load_state_dict(folder)["w"].shape == (2, 3)
    DCP_DAMAGE[damage](folder)
    with pytest.raises((tk.CorruptFileError, tk.UnsafeFileError)):
        tk.load_state_dict(folder)
    assert not tk.verify(folder).ok


def test_damaged_native_manifest_records_fail_typed(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    tk.save_checkpoint(folder, model=net())
    good = json.loads((folder / "checkpoint.json").read_text())
    name = next(iter(good["tensors"]))
    file = next(iter(good["files"]))
    for damage in (
        lambda m: m["tensors"][name].update(dtype="load"),
        lambda m: m["tensors"][name].update(shape=[True, 2]),
        lambda m: m["tensors"][name].update(file=["x"]),
        lambda m: m["files"][file].update(bytes="12"),
        lambda m: m["state"]["model"]["value"].update(x={"__tk__": "tensor", "name": ["n"]}),
        lambda m: m.update(tensors=[]),
    ):
        manifest = json.loads(json.dumps(good))
        damage(manifest)
        (folder / "checkpoint.json").write_text(json.dumps(manifest))
        with pytest.raises(tk.CorruptFileError):
            tk.load_state_dict(folder, entry="model")
        assert not tk.verify(folder).ok


# ------------------------------------------------------------------------------ downloads


def test_a_cached_file_changed_since_download_is_downloaded_again(server: Server) -> None:
    url, digest = publish(server, "weights.safetensors", net())
    assert tk.load(net(), url, sha256=digest).ok
    cached = cached_path(url)
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x01")  # damaged in the cache
    assert tk.load(net(), url, sha256=digest).ok
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest
    assert len(server.requests) == 2
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x02")  # and without an expected hash
    assert tk.load(net(), url).ok
    assert len(server.requests) == 3
    assert tk.load(net(), url).ok  # an intact entry is a hit
    assert len(server.requests) == 3


def test_a_cached_file_that_does_not_match_the_expected_hash_is_never_used(
    server: Server,
) -> None:
    url, digest = publish(server, "weights.safetensors", net())
    assert tk.load(net(), url).ok
    cached = cached_path(url)
    # The server now sends other bytes; the caller pins the old ones.
    other = net()
    torch.nn.init.zeros_(other[0].weight)
    tk.save(other, server.folder / "weights.safetensors")
    new_digest = hashlib.sha256((server.folder / "weights.safetensors").read_bytes()).hexdigest()
    assert tk.load(net(), url, sha256=new_digest).ok  # the stale entry is replaced
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == new_digest
    with pytest.raises(tk.ChecksumError):
        tk.load(net(), url, sha256=digest)  # neither the cache nor the server has those bytes
    assert not cached.exists()


def test_a_cache_entry_without_its_record_is_downloaded_again(server: Server) -> None:
    url, _ = publish(server, "weights.safetensors", net())
    assert tk.load(net(), url).ok
    cached = cached_path(url)
    for record in cached.parent.glob(".*.sha256"):
        record.unlink()
    assert tk.load(net(), url).ok
    assert len(server.requests) == 2


def test_verify_opens_files_the_way_loads_do(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tk.save(net(), path)
    with open_format(path, SAFETENSORS, OpenOptions()) as source:
        assert source.entries()[""]
    assert tk.verify(path).ok
