"""Files written by torch.save, safetensors and other tools load into the model they came from.

The files are also checked against tests/data/golden/MANIFEST.json, every expectation it records.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import hashlib
import io
import json
import math
import pickle
import pickletools
import re
import struct
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import GOLDEN, Net, Tied, assert_same_state, needs_cuda

import torchkeep as tk

# file -> (format torchkeep detects, entry holding the weights, prefix the file adds)
GOOD = {
    "net_state_dict.pt": ("torch-zip", "", ""),
    "net_state_dict.bin": ("torch-zip", "", ""),
    "net_state_dict.pkl": ("torch-zip", "", ""),
    "net_state_dict_legacy.pt": ("torch-legacy", "", ""),
    "net_dataparallel.pth": ("torch-zip", "", "module."),
    "net_compiled.pt": ("torch-zip", "", "_orig_mod."),
    "net_checkpoint.pt": ("torch-zip", "model_state_dict", ""),
    "net_lightning.ckpt": ("torch-zip", "state_dict", "model."),
    "net.safetensors": ("safetensors", "", ""),
    "net_sharded": ("sharded", "", ""),
    "net_sharded_bin": ("sharded", "", ""),
    "cuda_saved.pt": ("torch-zip", "", ""),
    "cuda1_saved.pt": ("torch-zip", "", ""),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_golden_file_loads_strictly_into_the_model(name: str, reference: dict) -> None:
    fmt, entry, prefix = GOOD[name]
    model = Net()
    report = tk.load(model, GOLDEN / name)
    assert report.ok
    assert report.format == fmt
    assert report.entry == entry
    assert sorted(report.loaded) == sorted(reference)
    assert len(report.renamed) == (len(reference) if prefix else 0)
    assert all(src == prefix + dst for src, dst in report.renamed)
    assert_same_state(model, reference)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_golden_file_reads_as_a_flat_dict(name: str, reference: dict) -> None:
    _, _, prefix = GOOD[name]
    state = tk.load_state_dict(GOLDEN / name)
    assert sorted(state) == sorted(prefix + k for k in reference)
    for key, value in reference.items():
        assert torch.equal(state[prefix + key], value)
        assert state[prefix + key].device.type == "cpu"


@pytest.mark.parametrize("name", sorted(GOOD))
def test_inspect_reads_shapes_without_data(name: str, reference: dict) -> None:
    info = tk.inspect(GOLDEN / name)
    _, entry, prefix = GOOD[name]
    assert info.entry == entry
    shapes = {t.name: t.shape for t in info.tensors}
    assert shapes == {prefix + k: tuple(v.shape) for k, v in reference.items()}
    assert info.num_params == sum(v.numel() for v in reference.values())
    assert info.size > 0


def test_checkpoint_dict_extras_are_listed() -> None:
    info = tk.inspect(GOLDEN / "net_checkpoint.pt")
    assert info.extras["epoch"] == "3"
    assert info.extras["loss"] == "0.25"
    assert "Namespace(" in info.extras["args"]
    assert set(info.entries) >= {"model_state_dict"}


def test_tied_weights_from_torch_save_stay_tied() -> None:
    state = tk.load_state_dict(GOLDEN / "tied.pt")
    assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()
    model = Tied()
    assert tk.load(model, GOLDEN / "tied.pt").ok
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight, state["emb.weight"])


def test_cuda_saved_file_maps_with_a_location_dict(reference: dict) -> None:
    state = tk.load_state_dict(GOLDEN / "cuda1_saved.pt", device={"cuda:1": "cpu"})
    assert all(t.device.type == "cpu" for t in state.values())
    assert torch.equal(state["fc.weight"], reference["fc.weight"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(tk.DeviceError, match="CUDA is not available"):
        tk.load_state_dict(GOLDEN / "cuda_saved.pt", device="cuda")
    with pytest.raises(tk.DeviceError, match="'cuda:0': CUDA is not available"):
        tk.load_state_dict(GOLDEN / "cuda1_saved.pt", device={"cuda:1": "cuda:0"})


@needs_cuda
def test_cuda_location_map_on_a_gpu_machine(reference: dict) -> None:
    state = tk.load_state_dict(GOLDEN / "cuda1_saved.pt", device={"cuda:1": "cuda:0"})
    assert all(t.device == torch.device("cuda:0") for t in state.values())
    model = Net().cuda()
    tk.load(model, GOLDEN / "cuda_saved.pt")
    assert model.fc.weight.device.type == "cuda"
    assert torch.equal(model.fc.weight.cpu(), reference["fc.weight"])


def test_lightning_checkpoint_loads_into_a_lightning_style_wrapper(reference: dict) -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Net()

    wrapper = Wrapper()
    report = tk.load(wrapper, GOLDEN / "net_lightning.ckpt")
    assert report.ok and not report.renamed
    assert_same_state(wrapper.model, reference)


# ------------------------------------------------------------------------------- MANIFEST.json
#
# MANIFEST.json records what each golden file is: its bytes (size, sha256), its format, its
# tensors, where the weights sit, how the corrupt ones were made and how each loader fails on
# them. Every recorded expectation is asserted against the files here, so a golden file
# changed without its manifest entry (or the other way round) fails.

MANIFEST = json.loads((GOLDEN / "MANIFEST.json").read_text())
ENTRIES = {entry["filename"]: entry for entry in MANIFEST["files"]}
PWNED_MARKER = Path("/tmp/torchkeep_pwned_marker")

# Which test checks each field; the DESCRIPTIVE ones are prose that only explains.
CHECKED_BY = {
    "test_golden_bytes_match_the_manifest": {"filename", "size", "sha256", "files"},
    "test_golden_format_matches_the_manifest": {"format"},
    "test_golden_structure_matches_the_manifest": {
        "tensors", "all_tensors", "weights_entry", "key_prefix", "shared_storage",
        "storage_records_in_zip", "storage_location", "locations_rewritten", "pickle_globals",
        "dangerous_globals", "pickled_class", "malicious",
    },
    "test_golden_values_are_the_reference": {"reference"},
    "test_golden_file_fails_as_recorded": {"expected_error"},
    "test_corrupt_golden_file_is_the_corruption_recorded": {
        "expect", "derived_from", "original_size", "truncated_to", "header_length_field",
        "victim", "original_offsets", "lying_offsets", "data_region_bytes", "byte_offset",
        "member", "offset_in_member", "tensor", "element_index", "xor", "value_before",
        "value_after",
    },
    "test_sharded_golden_folder_matches_its_index": {"index", "total_size", "weight_map"},
}  # fmt: skip
DESCRIPTIVE = {"written_by", "top_level", "load", "notes", "expected_error_note", "failure_mode"}
TOP_LEVEL = {
    "generator", "regenerate", "torch_version", "safetensors_version", "numpy_version",
    "python_version", "seed", "conventions", "models", "files",
}  # fmt: skip

_STORAGE_DTYPES = {
    "FloatStorage": "torch.float32",
    "DoubleStorage": "torch.float64",
    "HalfStorage": "torch.float16",
    "BFloat16Storage": "torch.bfloat16",
    "LongStorage": "torch.int64",
    "IntStorage": "torch.int32",
    "ShortStorage": "torch.int16",
    "CharStorage": "torch.int8",
    "ByteStorage": "torch.uint8",
    "BoolStorage": "torch.bool",
}
_SAFETENSORS_DTYPES = {"F32": "torch.float32", "F64": "torch.float64", "I64": "torch.int64"}
_LEGACY_MAGIC = b"\x80\x02\x8a\n" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


@pytest.fixture(autouse=True)
def no_pwned_marker() -> Iterator[None]:
    PWNED_MARKER.unlink(missing_ok=True)
    yield
    assert not PWNED_MARKER.exists(), "a malicious pickle ran code"


# A reader that walks a pickle without running anything from it: every global the pickle
# names becomes an inert stand-in (recorded), except the few torch uses to describe tensors,
# which become records of storage type, key, location and shape. The malicious files are
# read only this way.


class _Inert:
    """Any global a pickle names, made harmless: building or calling it runs nothing."""

    args: tuple[Any, ...] = ()
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Dict(dict):  # OrderedDict, which torch's state dicts also give attributes
    pass


@dataclasses.dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    location: str


@dataclasses.dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: str


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], globals_seen: list[str]) -> None:
        super().__init__(file)
        self.globals_seen = globals_seen

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in self.globals_seen:
            self.globals_seen.append(qualified)
        if qualified == "collections.OrderedDict":
            return _Dict
        if qualified in ("__builtin__.set", "builtins.set"):
            return set
        if qualified == "torch._utils._rebuild_tensor_v2":
            return lambda storage, offset, size, *rest: _Tensor(storage, tuple(size))
        if qualified == "torch._utils._rebuild_parameter":
            return lambda data, *rest: data
        if qualified == "torch.storage._load_from_bytes":
            return lambda data: _inert_load(io.BytesIO(data), 5, [])[3]  # legacy bytes
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        return type(qualified, (_Inert,), {})

    def persistent_load(self, pid: Any) -> _Storage:
        assert pid[0] == "storage", pid
        return _Storage(pid[1].dtype, pid[2], pid[3])


def _inert_load(file: IO[bytes], count: int, globals_seen: list[str]) -> list[Any]:
    """The next ``count`` pickles in ``file`` (a legacy torch file holds five), walked inertly."""
    return [_InertUnpickler(file, globals_seen).load() for _ in range(count)]


def _inert_root(path: Path) -> tuple[Any, list[str]]:
    """The object a torch or pickle file holds, walked inertly, and the globals it names."""
    globals_seen: list[str] = []
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickle_name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            data = archive.read(pickle_name)
    elif data.startswith(_LEGACY_MAGIC):
        # magic number, protocol, system info, the object, its storage keys; then the data
        return _inert_load(io.BytesIO(data), 5, globals_seen)[3], globals_seen
    return _inert_load(io.BytesIO(data), 1, globals_seen)[0], globals_seen


def _flatten(obj: Any, prefix: str = "") -> dict[str, _Tensor]:
    """Every tensor in nested containers, keyed by a '/'-joined path (the manifest's way)."""
    if isinstance(obj, _Tensor):
        return {prefix: obj}
    items: Any = ()
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    found: dict[str, _Tensor] = {}
    for key, value in items:
        found.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return found


def _module_state(module: _Inert, prefix: str = "") -> dict[str, _Tensor]:
    """A pickled nn.Module's state_dict names, from its pickled attributes."""
    state = module.state
    found = {prefix + k: v for k, v in state["_parameters"].items() if v is not None}
    skip = state.get("_non_persistent_buffers_set", set())
    found.update(
        {prefix + k: v for k, v in state["_buffers"].items() if v is not None and k not in skip}
    )
    for name, child in state["_modules"].items():
        found.update(_module_state(child, f"{prefix}{name}."))
    return found


def _safetensors_header(data: bytes) -> tuple[dict[str, Any], int]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), 8 + size


def _described(tensors: dict[str, _Tensor]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": v.storage.dtype} for k, v in tensors.items()}


def _safetensors_tensors(path: Path) -> dict[str, dict[str, Any]]:
    header, _ = _safetensors_header(path.read_bytes())
    header.pop("__metadata__", None)
    return {
        k: {"shape": v["shape"], "dtype": _SAFETENSORS_DTYPES[v["dtype"]]}
        for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    }


def _sniff(path: Path) -> str:
    """The file's format, from its bytes alone."""
    if path.is_dir():
        if (path / "model.safetensors.index.json").is_file():
            return "hf-sharded-safetensors"
        return "hf-sharded-torch" if (path / "pytorch_model.bin.index.json").is_file() else ""
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        return "torch-zip" if any(n.endswith("/data.pkl") for n in names) else "zip"
    if data.startswith(_LEGACY_MAGIC):
        return "torch-legacy"
    if len(data) > 8:
        try:
            header, start = _safetensors_header(data)
        except ValueError:
            header, start = {}, 0
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if ends and start + max(ends) == len(data):
            return "safetensors"
    if data.startswith(b"\x80") and data.endswith(b"."):
        return "plain-pickle"
    if data.isascii() and data and all(c.isprintable() or c.isspace() for c in data.decode()):
        return "text"
    return "unknown"


@contextlib.contextmanager
def _make_golden_importable() -> Iterator[None]:
    """whole_model.pt pickles make_golden.Net; other tests need make_golden unimported."""
    folder = str(GOLDEN.parent)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)
        sys.modules.pop("make_golden", None)


def _load_weights(name: str) -> dict[str, torch.Tensor]:
    """The weights of a golden file that is safe to load, read by torch or safetensors."""
    entry = ENTRIES[name]
    assert not entry.get("malicious"), "a malicious file is never loaded"
    path = GOLDEN / name
    if entry["format"] == "safetensors":
        return safetensors.torch.load_file(path)
    if entry["format"].startswith("hf-sharded"):
        merged: dict[str, torch.Tensor] = {}
        for shard in sorted(set(entry["weight_map"].values())):
            if shard.endswith(".safetensors"):
                merged.update(safetensors.torch.load_file(path / shard))
            else:
                merged.update(torch.load(path / shard, weights_only=True))
        return merged
    if "pickled_class" in entry:
        with _make_golden_importable():
            return torch.load(path, weights_only=False).state_dict()
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, weights_only=True, map_location="cpu")
    return obj if entry["weights_entry"] is None else obj[entry["weights_entry"]]


def test_manifest_lists_exactly_the_files_on_disk() -> None:
    assert set(MANIFEST) == TOP_LEVEL
    assert (GOLDEN.parent.parent.parent / MANIFEST["generator"]).is_file()
    assert len(ENTRIES) == len(MANIFEST["files"]), "a file is listed twice"
    listed = set()
    for name, entry in ENTRIES.items():
        if name.endswith("/"):
            listed |= {name + child for child in entry["files"]}
        else:
            listed.add(name)
    on_disk = {p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*") if p.is_file()} - {
        "MANIFEST.json"
    }
    assert on_disk == listed


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_manifest_field_is_checked(name: str) -> None:
    unknown = set(ENTRIES[name]).difference(DESCRIPTIVE, *CHECKED_BY.values())
    assert not unknown, f"{name}: no test checks {sorted(unknown)}; add a check for them"


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_golden_bytes_match_the_manifest(name: str) -> None:
    entry = ENTRIES[name]
    path = GOLDEN / name
    if name.endswith("/"):
        assert path.is_dir()
        for child, recorded in entry["files"].items():
            data = (path / child).read_bytes()
            assert len(data) == recorded["size"], child
            assert hashlib.sha256(data).hexdigest() == recorded["sha256"], child
        assert entry["size"] == sum(f["size"] for f in entry["files"].values())
    else:
        data = path.read_bytes()
        assert len(data) == entry["size"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_golden_format_matches_the_manifest(name: str) -> None:
    fmt = ENTRIES[name]["format"]
    if fmt.startswith("corrupt-"):
        # Made from a good file of that format, which it no longer is (or no longer is whole).
        source = ENTRIES[ENTRIES[name]["derived_from"]]
        assert source["format"] == fmt.removeprefix("corrupt-")
        assert (GOLDEN / name).read_bytes() != (GOLDEN / source["filename"]).read_bytes()
    else:
        assert _sniff(GOLDEN / name) == {"corrupt": "unknown"}.get(fmt, fmt)


@pytest.mark.parametrize("name", sorted(n for n, e in ENTRIES.items() if "tensors" in e))
def test_golden_structure_matches_the_manifest(name: str) -> None:
    entry = ENTRIES[name]
    path = GOLDEN / name
    fmt = entry["format"]
    if fmt == "safetensors":
        assert entry["weights_entry"] is None
        assert _safetensors_tensors(path) == entry["tensors"]
        return
    if fmt.startswith("hf-sharded"):
        assert entry["weights_entry"] is None
        merged: dict[str, dict[str, Any]] = {}
        for shard in sorted(set(entry["weight_map"].values())):
            if shard.endswith(".safetensors"):
                merged.update(_safetensors_tensors(path / shard))
            else:
                merged.update(_described(_flatten(_inert_root(path / shard)[0])))
        assert merged == entry["tensors"]
        return
    root, globals_seen = _inert_root(path)
    if "pickle_globals" in entry:
        assert globals_seen == entry["pickle_globals"]
    if entry.get("malicious"):
        # Everything it names beyond what a plain state dict needs, each once.
        dangerous = entry["dangerous_globals"]
        assert len(set(dangerous)) == len(dangerous) and set(dangerous) == set(globals_seen) - {
            "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2",
            *(f"torch.{name}" for name in _STORAGE_DTYPES),
        }
        assert "expected_error" not in entry  # never handed to a loader
    else:
        assert "dangerous_globals" not in entry
    if "pickled_class" in entry:
        assert type(root).__name__ == entry["pickled_class"]
        assert entry["weights_entry"] is None
        tensors = everything = _module_state(root)
    else:
        everything = _flatten(root)
        if "all_tensors" in entry:
            assert list(_described(everything).items()) == list(entry["all_tensors"].items())
        weights = root if entry["weights_entry"] is None else root[entry["weights_entry"]]
        tensors = _flatten(weights)
    assert list(_described(tensors).items()) == list(entry["tensors"].items())
    if "key_prefix" in entry:
        prefix = entry["key_prefix"]
        assert all(k.startswith(prefix) for k in tensors)
        assert [k.removeprefix(prefix) for k in tensors] == list(
            ENTRIES["net_state_dict.pt"]["tensors"]
        )
    storages = {t.storage for t in everything.values()}
    if "storage_location" in entry:
        location = entry["storage_location"]
        assert {s.location for s in storages} == {location}
        with zipfile.ZipFile(path) as archive:
            pickle_name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            strings = [
                arg
                for op, arg, _ in pickletools.genops(archive.read(pickle_name))
                if "UNICODE" in op.name
            ]
        assert strings.count(location) == entry["locations_rewritten"] and "cpu" not in strings
    else:
        assert {s.location for s in storages} == {"cpu"}
    by_storage: dict[_Storage, list[str]] = {}
    for tensor_name, tensor in tensors.items():
        by_storage.setdefault(tensor.storage, []).append(tensor_name)
    shared = sorted(names for names in by_storage.values() if len(names) > 1)
    assert shared == sorted(sorted(group) for group in entry.get("shared_storage", []))
    if "storage_records_in_zip" in entry:
        with zipfile.ZipFile(path) as archive:
            records = [n for n in archive.namelist() if re.search(r"/data/\d+$", n)]
        assert len(records) == entry["storage_records_in_zip"] == len(storages)


REFERENCE_FILES = sorted(
    n
    for n, e in ENTRIES.items()
    if "tensors" in e
    and any(fnmatch.fnmatch(n, glob) for glob in ("net[._]*", "cuda*_saved.pt", "whole_model.pt"))
)


def test_the_reference_file_is_the_one_recorded() -> None:
    assert [n for n, e in ENTRIES.items() if e.get("reference")] == ["net_state_dict.pt"]
    assert all("reference" not in e or e["reference"] is True for e in ENTRIES.values())


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_golden_values_are_the_reference(name: str, reference: dict) -> None:
    prefix = ENTRIES[name].get("key_prefix", "")
    weights = _load_weights(name)
    assert sorted(weights) == sorted(prefix + k for k in reference)
    for key, value in reference.items():
        loaded = weights[prefix + key]
        assert loaded.dtype == value.dtype and torch.equal(loaded.cpu(), value), key


def _release(version: str) -> str:
    return version.split("+")[0]  # the same messages whatever the build (cpu, cu128, ...)


ERRORS = [(n, i) for n, e in ENTRIES.items() for i in range(len(e.get("expected_error", [])))]


@pytest.mark.parametrize(("name", "index"), ERRORS, ids=[f"{n}-{i}" for n, i in ERRORS])
def test_golden_file_fails_as_recorded(name: str, index: int) -> None:
    entry = ENTRIES[name]
    expected = entry["expected_error"][index]
    loader = expected["loader"]
    assert not entry.get("malicious"), "a malicious file is never loaded"
    recorded = MANIFEST["torch_version"]
    if loader.startswith("torch") and _release(torch.__version__) != _release(recorded):
        pytest.skip(f"messages recorded with torch {recorded}")
    if loader.startswith("st_") and safetensors.__version__ != MANIFEST["safetensors_version"]:
        pytest.skip(f"messages recorded with safetensors {MANIFEST['safetensors_version']}")
    if "storage_location" in entry and torch.cuda.is_available():
        pytest.skip("recorded on a machine without CUDA")
    path = GOLDEN / name

    def read_pickle_member() -> bytes:
        with zipfile.ZipFile(path) as archive:
            return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))

    loaders = {
        "torch_wo": lambda: torch.load(path, weights_only=True),
        "torch_full": lambda: torch.load(path, weights_only=False),
        "st_load_file": lambda: safetensors.torch.load_file(path),
        "zipfile_read": read_pickle_member,
    }
    with pytest.raises(Exception) as info:
        loaders[loader]()
    assert type(info.value).__name__ == expected["exception"], info.value
    assert expected["message_contains"] in str(info.value)


CORRUPT = sorted(n for n, e in ENTRIES.items() if "expect" in e or "derived_from" in e)


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_golden_file_is_the_corruption_recorded(name: str) -> None:
    entry = ENTRIES[name]
    data = (GOLDEN / name).read_bytes()
    if "tensor" not in entry:  # all but the one whose damage only a value comparison sees
        assert entry["expect"] == "fails" and entry["expected_error"]
    if "derived_from" not in entry:
        return
    source = (GOLDEN / entry["derived_from"]).read_bytes()
    changed = [i for i in range(min(len(data), len(source))) if data[i] != source[i]]
    if "truncated_to" in entry:
        assert len(data) == entry["truncated_to"] < entry["original_size"] == len(source)
        assert source.startswith(data)
    elif "header_length_field" in entry:
        assert struct.unpack("<Q", data[:8])[0] == entry["header_length_field"] > len(data)
        assert data[8:] == source[8:]
    elif "victim" in entry:
        victim = entry["victim"]
        (header, start), (original, source_start) = map(_safetensors_header, (data, source))
        assert original[victim]["data_offsets"] == entry["original_offsets"]
        assert header[victim]["data_offsets"] == entry["lying_offsets"]
        assert len(data) - start == len(source) - source_start == entry["data_region_bytes"]
        assert entry["lying_offsets"][1] > entry["data_region_bytes"]
        del header[victim], original[victim]
        assert header == original and data[start:] == source[source_start:]
    elif "member" in entry:
        assert len(data) == len(source) and changed == [entry["byte_offset"]]
        with zipfile.ZipFile(GOLDEN / name) as archive:
            local = archive.getinfo(entry["member"]).header_offset
        name_size, extra_size = struct.unpack("<HH", data[local + 26 : local + 30])
        member_start = local + 30 + name_size + extra_size
        assert member_start + entry["offset_in_member"] == entry["byte_offset"]
    elif "tensor" in entry:
        tensor, at, element = entry["tensor"], entry["byte_offset"], entry["element_index"]
        assert len(data) == len(source) and changed == [at]
        assert data[at] ^ source[at] == entry["xor"]
        header, start = _safetensors_header(source)
        first = start + header[tensor]["data_offsets"][0] + 4 * element  # float32
        assert first <= at < first + 4
        assert struct.unpack("<f", source[first : first + 4])[0] == entry["value_before"]
        assert struct.unpack("<f", data[first : first + 4])[0] == entry["value_after"]
        # What "expect" says: it loads, and only that element differs from its source.
        loaded = safetensors.torch.load_file(GOLDEN / name)
        good = safetensors.torch.load_file(GOLDEN / entry["derived_from"])
        source_name = entry["derived_from"]
        assert (
            entry["expect"]
            == f"loads, but {tensor}.flatten()[{element}] differs from {source_name}"
        )
        assert sorted(loaded) == sorted(good)
        for key, value in good.items():
            differs = (loaded[key].flatten() != value.flatten()).nonzero().flatten().tolist()
            assert differs == ([element] if key == tensor else []), key
    else:  # a byte of the header changed so that it is no JSON
        assert len(data) == len(source) and changed == [entry["byte_offset"]]
        assert 8 <= entry["byte_offset"] < _safetensors_header(source)[1]
        with pytest.raises(ValueError):
            _safetensors_header(data)


@pytest.mark.parametrize("name", sorted(n for n, e in ENTRIES.items() if "weight_map" in e))
def test_sharded_golden_folder_matches_its_index(name: str) -> None:
    entry = ENTRIES[name]
    folder = GOLDEN / name
    index = json.loads((folder / entry["index"]).read_text())
    assert index["weight_map"] == entry["weight_map"]
    assert index["metadata"]["total_size"] == entry["total_size"]
    shards = set(entry["weight_map"].values())
    assert set(entry["files"]) == shards | {entry["index"]}
    for shard in shards:
        if shard.endswith(".safetensors"):
            held = set(_safetensors_tensors(folder / shard))
        else:
            held = set(_flatten(_inert_root(folder / shard)[0]))
        assert held == {k for k, v in entry["weight_map"].items() if v == shard}, shard
    nbytes = sum(
        math.prod(t["shape"]) * torch.empty((), dtype=getattr(torch, t["dtype"][6:])).element_size()
        for t in entry["tensors"].values()
    )
    assert nbytes == entry["total_size"]
