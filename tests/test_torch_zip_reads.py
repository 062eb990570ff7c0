"""torch zip files read straight from their records: the same tensors as ``torch.load``, read
in parallel into their destinations, one tensor at a time when converted, and every record
whose zip entries disagree refused before a byte of it is read."""

from __future__ import annotations

import collections
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import assert_convert_streams, write_big_state
from torch import nn

import torchkeep as tk
import torchkeep.formats.torch_pickle as torch_pickle
import torchkeep.io.read
from torchkeep._tensors import NAME_FROM_DTYPE
from torchkeep.errors import CorruptFileError, UnsafeFileError

QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
TORCH_SAVES = sorted(
    (set(torch.storage._dtype_to_storage_type_map()) | set(torch.storage._new_dtypes()))  # type: ignore[no-untyped-call]
    - QUANTIZED,
    key=str,
)


def _bytes(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` with arbitrary bytes (bool: 0 or 1)."""
    count = torch.Size(shape).numel() * dtype.itemsize
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(
        0, high, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return raw.view(dtype).reshape(shape)


def _state() -> dict[str, torch.Tensor]:
    """Every dtype torch.save writes, views sharing one storage, and tensors of no elements."""
    state = {
        f"d_{str(dtype).removeprefix('torch.')}": _bytes(dtype, (3, 5), seed)
        for seed, dtype in enumerate(TORCH_SAVES)
    }
    base = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    state.update(
        base=base,
        tied=base,  # the same tensor under two names
        row=base[7],  # a contiguous view at a storage offset
        rows=base[10:20],
        col=base[:, 3],  # views that are not contiguous
        transposed=base.t(),
        strided=base[1::3, 2::5],
        expanded=torch.arange(4.0).expand(3, 4),
        empty=torch.empty(0, 5),
        empty_view=base[5:5],
        scalar=torch.tensor(2.5),
        int_scalar=torch.tensor(7),
    )
    # Large enough that parallel reads cut inside tensors.
    for i in range(3):
        state[f"large{i}"] = torch.randn(300_000, generator=torch.Generator().manual_seed(10 + i))
    state["large_tail"] = state["large0"][150_001:]
    return state


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _same(expected: torch.Tensor, got: torch.Tensor, name: str) -> None:
    assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
    assert torch.equal(_raw(expected), _raw(got)), name


def _sharing(state: dict[str, Any]) -> set[tuple[str, str]]:
    """Pairs of names whose tensors share memory."""
    where = {
        name: t.untyped_storage().data_ptr()
        for name, t in state.items()
        if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()
    }
    return {(a, b) for a in where for b in where if a < b and where[a] == where[b]}


def _buffers(state: dict[str, torch.Tensor]) -> nn.Module:
    """A model with one zeroed, contiguous buffer per name of ``state``."""
    model = nn.Module()
    for name, tensor in state.items():
        zeros = torch.zeros(tensor.numel() * tensor.element_size(), dtype=torch.uint8)
        model.register_buffer(name, zeros.view(tensor.dtype).reshape(tensor.shape))
    return model


@pytest.fixture(params=["threads=1", "threads=4"])
def io_threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHKEEP_IO_THREADS", request.param.removeprefix("threads="))
    # Every read goes through the threads, however small the file.
    monkeypatch.setattr(torchkeep.io.read, "SEQUENTIAL_BELOW", 0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("zip") / "state.pt"
    torch.save(_state(), path)
    return path


def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """Names the torch zip source reads straight into their destinations, and names it reads
    into new memory first (to be copied or cast)."""
    direct: list[str] = []
    copied: list[str] = []
    read = torchkeep.io.read.read_extents
    get = torch_pickle.TorchZipSource.get

    def spy_read(extents: Any, **kwargs: Any) -> None:
        direct.extend(e.name for e in extents)
        read(extents, **kwargs)

    def spy_get(self: torch_pickle.TorchZipSource, entry: str, name: str) -> torch.Tensor:
        copied.append(name)
        with monkeypatch.context() as patch:
            patch.setattr(torch_pickle, "read_extents", read)
            return get(self, entry, name)

    monkeypatch.setattr(torch_pickle, "read_extents", spy_read)
    monkeypatch.setattr(torch_pickle.TorchZipSource, "get", spy_get)
    return direct, copied


@pytest.mark.usefixtures("io_threads")
def test_load_reads_each_tensor_straight_into_the_model(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = torch.load(saved, weights_only=True)
    model = _buffers(expected)
    direct, copied = _spy(monkeypatch)
    report = tk.load(model, saved)
    assert sorted(report.loaded) == sorted(expected)
    got = dict(model.named_buffers())
    for name, tensor in expected.items():
        _same(tensor, got[name], name)
    # Tensors contiguous in their storage go straight from the file; the others are copied.
    contiguous = {n for n, t in expected.items() if t.is_contiguous()}
    assert {n for n in contiguous if expected[n].numel()} <= set(direct) <= contiguous
    assert set(copied) - {"empty"} == {"col", "transposed", "strided", "expanded"}


@pytest.mark.usefixtures("io_threads")
def test_load_casts_and_copies_what_cannot_be_read_straight(saved: Path) -> None:
    expected = torch.load(saved, weights_only=True)
    floats = {n: t for n, t in expected.items() if t.dtype == torch.float32}
    model = nn.Module()
    for name, tensor in floats.items():
        model.register_buffer(name, torch.zeros(tensor.shape, dtype=torch.float64))
    tk.load(model, saved, strict=False)
    for name, tensor in floats.items():
        assert torch.equal(getattr(model, name), tensor.double()), name


@pytest.mark.usefixtures("io_threads")
def test_load_state_dict_gives_what_torch_load_gives(saved: Path) -> None:
    expected = torch.load(saved, weights_only=True)
    got = tk.load_state_dict(saved)
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        _same(tensor, got[name], name)
        assert got[name].stride() == tensor.stride(), name
        assert got[name].storage_offset() == tensor.storage_offset(), name
    assert _sharing(got) == _sharing(expected)


@pytest.mark.usefixtures("io_threads")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_convert_writes_what_torch_load_gives(saved: Path, suffix: str, tmp_path: Path) -> None:
    expected = torch.load(saved, weights_only=True)
    source = saved
    if suffix == ".safetensors":
        # safetensors has no name for some dtypes (complex, bits); those stay out.
        kept = {
            n: t
            for n, t in expected.items()
            if t.dtype in NAME_FROM_DTYPE and not (t.dim() == 0 and t.element_size() == 1)
        }
        source = tmp_path / "kept.pt"
        torch.save(kept, source)
        expected = torch.load(source, weights_only=True)
    out = tmp_path / f"out{suffix}"
    result = tk.convert(source, out)
    assert result.tensors == len(expected)
    got = (
        safetensors.torch.load_file(out)
        if suffix == ".safetensors"
        else torch.load(out, weights_only=True)
    )
    # Tied names are stored once in safetensors (recorded as aliases).
    got = {**got, **tk.load_state_dict(out)}
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        _same(tensor, got[name], name)


def test_big_endian_files_are_swapped_as_torch_swaps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {"w": torch.arange(12, dtype=torch.int32).reshape(3, 4), "b": torch.arange(3.0)}
    path = tmp_path / "big.pt"
    with monkeypatch.context() as patch:
        patch.setattr(sys, "byteorder", "big")  # what torch.save records as the byte order
        torch.save(state, path)
    expected = torch.load(path, weights_only=True)
    model = _buffers(state)
    tk.load(model, path)
    assert torch.equal(model.get_buffer("w"), expected["w"]) and torch.equal(
        model.get_buffer("b"), expected["b"]
    )
    assert not torch.equal(model.get_buffer("w"), state["w"])


# -- crafted and damaged files ----------------------------------------------------------------

# Local file header fields: (offset in the header, struct format).
_FLAGS, _METHOD, _COMPRESSED, _SIZE, _EXTRA_LEN = (
    (6, "<H"),
    (8, "<H"),
    (18, "<I"),
    (22, "<I"),
    (28, "<H"),
)


def _info(path: Path, suffix: str) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as archive:
        return next(i for i in archive.infolist() if i.filename.endswith(suffix))


def _patch_local(path: Path, suffix: str, field: tuple[int, str], value: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(field[1], data, _info(path, suffix).header_offset + field[0], value)
    path.write_bytes(bytes(data))


def _rewrite(
    source: Path, dest: Path, *, method: Callable[[str], int] = lambda _: 0, zip64: bool = False
) -> None:
    """The same members written again by Python's zipfile (sizes in the local headers)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(dest, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            entry.compress_type = method(info.filename)
            with new.open(entry, "w", force_zip64=zip64) as f:
                f.write(data)


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _View:
    """Pickles as torch's ``_rebuild_tensor_v2`` of a storage, with any offset and size."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...]) -> None:
        self.args: tuple[Any, ...] = (
            storage,
            offset,
            size,
            (1,) * len(size),
            False,
            collections.OrderedDict(),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _crafted(path: Path, state: dict[str, _View], records: dict[str, torch.Tensor]) -> None:
    """A torch zip of a hand-made pickle: views of records that need not fit them."""
    with open(path.with_suffix(".pkl"), "wb") as f:
        _Pickler(f, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", path.with_suffix(".pkl").read_bytes())
        archive.writestr("archive/byteorder", "little")
        for key, tensor in records.items():
            archive.writestr(f"archive/data/{key}", _raw(tensor).numpy().tobytes())
        archive.writestr("archive/version", "3\n")


def _two_tensors(path: Path) -> dict[str, torch.Tensor]:
    state = {"a": torch.arange(64.0), "b": torch.arange(32, dtype=torch.int64)}
    torch.save(state, path)
    return state


def _extra_past_the_record(path: Path) -> None:
    _patch_local(path, "data/0", _EXTRA_LEN, _info(path, "data/0").extra.__len__() + 128)


def _extra_past_the_directory(path: Path) -> None:
    _patch_local(path, "data/1", _EXTRA_LEN, 0xFFFF)


def _sizes_that_disagree(path: Path) -> None:
    _patch_local(path, "data/0", _FLAGS, 0)
    _patch_local(path, "data/0", _COMPRESSED, 256 + 64)
    _patch_local(path, "data/0", _SIZE, 256 + 64)


def _sizes_with_descriptor(path: Path) -> None:
    _patch_local(path, "data/0", _SIZE, 128)  # torch writes zeros here


def _method_that_disagrees(path: Path) -> None:
    _patch_local(path, "data/0", _METHOD, zipfile.ZIP_DEFLATED)


def _compressed_record(path: Path) -> None:
    plain = path.with_suffix(".plain")
    path.rename(plain)
    _rewrite(plain, path, method=lambda n: zipfile.ZIP_DEFLATED if n.endswith("data/0") else 0)


def _view_past_the_record(path: Path) -> None:
    storage = _Storage("0", 8)
    _crafted(path, {"a": _View(storage, 6, (4,))}, {"0": torch.arange(8.0)})


def _storage_past_the_record(path: Path) -> None:
    _crafted(path, {"a": _View(_Storage("0", 16), 0, (16,))}, {"0": torch.arange(8.0)})


DAMAGE: dict[str, Callable[[Path], None]] = {
    "local header extra runs the data into the next member": _extra_past_the_record,
    "local header extra runs the data past the zip directory": _extra_past_the_directory,
    "local header sizes disagree with the directory": _sizes_that_disagree,
    "local header sizes beside a data descriptor": _sizes_with_descriptor,
    "local header method disagrees with the directory": _method_that_disagrees,
    "compressed record": _compressed_record,
    "tensor view past its record": _view_past_the_record,
    "storage larger than its record": _storage_past_the_record,
}


@pytest.mark.usefixtures("io_threads")
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_records_are_refused_before_anything_is_read(damage: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    _two_tensors(path)
    DAMAGE[damage](path)
    model = nn.Module()
    model.register_buffer("a", torch.full((64,), -1.0))
    model.register_buffer("b", torch.full((32,), -1, dtype=torch.int64))
    if damage.startswith(("tensor view", "storage")):
        model = nn.Module()
        model.register_buffer("a", torch.full((4,) if "view" in damage else (16,), -1.0))
    with pytest.raises((CorruptFileError, UnsafeFileError)):
        tk.load(model, path)
    assert all(bool((t == -1).all()) for t in model.buffers()), "the model was touched"
    with pytest.raises((CorruptFileError, UnsafeFileError)):
        tk.load_state_dict(path)
    with pytest.raises((CorruptFileError, UnsafeFileError)):
        tk.convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_crafted_files_that_fit_their_records_load(tmp_path: Path) -> None:
    """The control for the refusals above: the same construction, within bounds."""
    path = tmp_path / "fits.pt"
    _crafted(path, {"a": _View(_Storage("0", 8), 3, (4,))}, {"0": torch.arange(8.0)})
    model = nn.Module()
    model.register_buffer("a", torch.zeros(4))
    tk.load(model, path)
    assert torch.equal(model.get_buffer("a"), torch.arange(3.0, 7.0))
    assert torch.equal(tk.load_state_dict(path)["a"], torch.arange(3.0, 7.0))


@pytest.mark.parametrize("zip64", [False, True], ids=["sizes", "zip64"])
def test_zips_with_sizes_in_their_local_headers_load(zip64: bool, tmp_path: Path) -> None:
    original = tmp_path / "torch.pt"
    state = _two_tensors(original)
    path = tmp_path / "rewritten.pt"
    _rewrite(original, path, zip64=zip64)
    model = _buffers(state)
    tk.load(model, path)
    assert torch.equal(model.get_buffer("a"), state["a"]) and torch.equal(
        model.get_buffer("b"), state["b"]
    )
    tk.convert(path, tmp_path / "out.safetensors")
    assert torch.equal(safetensors.torch.load_file(tmp_path / "out.safetensors")["a"], state["a"])


# -- memory ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_converting_a_torch_zip_holds_about_one_tensor_at_a_time(tmp_path: Path) -> None:
    source = tmp_path / "big.pt"
    write_big_state(torch.save, source)
    small = tmp_path / "small.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4)}, small)
    assert_convert_streams(source, tmp_path, ["inspect", str(small)])
    expected = torch.load(source, weights_only=True)
    got = tk.load_state_dict(tmp_path / "o.safetensors", verify=True)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    # The torch zip output, written by torch's serializer one record at a time.
    zipped = torch.load(tmp_path / "o.pt", weights_only=True)
    assert list(zipped) == list(expected)
    assert all(torch.equal(zipped[name], tensor) for name, tensor in expected.items())
