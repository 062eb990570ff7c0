"""The opcode-checking pickle machine against Python's and torch's own unpicklers."""

from __future__ import annotations

import argparse
import collections
import datetime
import io
import pathlib
import pickle
import pickletools
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import torchkeep as tk
from torchkeep.safety.rules import SafeRules, classify
from torchkeep.safety.stubs import StubObject
from torchkeep.safety.unpickle import safe_pickle_load, safe_torch_load, scan_file, scan_pickle
from torchkeep.safety.vm import Limits, Machine

PLAIN: dict[str, Any] = {
    "ints": [0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**64 + 3, -(2**100)],
    "floats": [0.0, -1.5, 1e300, float("inf")],
    "text": ["", "ascii", "ünïcödé ✓", "x" * 300],
    "bytes": [b"", b"\x00\xff" * 200],
    "bytearray": bytearray(b"abc"),
    "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
    "nested": {"a": [{"b": ({"c": None},)}]},
    "set": {1, 2, 3},
    "frozenset": frozenset({"a", "b"}),
    "flags": [True, False, None],
    "complex": 1 + 2j,
    "ordered": collections.OrderedDict(b=1, a=2),
    "counter": collections.Counter("hello"),
    "default": collections.defaultdict(list, {"k": [1]}),
    "deque": collections.deque([1, 2], maxlen=5),
    "namespace": argparse.Namespace(lr=0.1, layers=[1, 2]),
    "simple": types.SimpleNamespace(x=1),
    "when": datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.timezone.utc),
    "day": datetime.date(2020, 1, 2),
    "delta": datetime.timedelta(days=3, seconds=4),
    "path": pathlib.PurePosixPath("runs/exp1"),
    "slice": slice(1, 10, 2),
    "range": range(3, 9),
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_values_come_back_as_python_unpickles_them(protocol: int) -> None:
    data = pickle.dumps(PLAIN, protocol=protocol)
    assert safe_pickle_load(data, path="plain.pkl") == pickle.loads(data)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_shared_and_recursive_references_are_kept(protocol: int) -> None:
    shared = [1, 2]
    loop: list[Any] = []
    loop.append(loop)
    got = safe_pickle_load(pickle.dumps([shared, shared, loop], protocol=protocol), path="p")
    assert got[0] is got[1]
    assert got[2][0] is got[2]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_values_match_numpy(protocol: int) -> None:
    value = {
        "array": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "bool": np.array([True, False]),
        "scalar": np.float64(2.5),
        "int": np.int64(-3),
        "dtype": np.dtype(">i4"),
    }
    got = safe_pickle_load(pickle.dumps(value, protocol=protocol), path="np.pkl")
    for key, expected in value.items():
        assert type(got[key]) is type(expected)
        if isinstance(expected, np.ndarray):
            assert got[key].dtype == expected.dtype
            assert np.array_equal(got[key], expected)
            assert got[key].flags.f_contiguous == expected.flags.f_contiguous
        else:
            assert got[key] == expected
    # np.dtype(...).__setstate__ on a copy: numpy's own int32 is unchanged.
    assert np.dtype("i4").byteorder == "="


def test_numpy_object_arrays_are_refused() -> None:
    data = pickle.dumps(np.array([{"a": 1}], dtype=object), protocol=2)
    with pytest.raises(tk.UnsafeFileError, match="dtype"):
        safe_pickle_load(data, path="objects.pkl")


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    state: dict[str, Any] = {
        "float": torch.randn(3, 4),
        "half": torch.randn(4).half(),
        "bf16": torch.randn(4).bfloat16(),
        "int8": torch.randint(-100, 100, (5,), dtype=torch.int8),
        "bool": torch.tensor([True, False]),
        "complex": torch.randn(3, dtype=torch.complex64),
        "view": base[1:4, ::2],  # offset and strides into a shared storage
        "transposed": base.t(),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 7),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "int_list": [1, 2, 3],
        "meta": {"epoch": 3, "args": argparse.Namespace(lr=1e-3)},
    }
    state["param"].tag = "decoder"  # a parameter with Python attributes
    return state


@pytest.mark.parametrize("zip_layout", [True, False])
@pytest.mark.parametrize("mmap", [False, True])
def test_torch_files_match_torch_load_weights_only(
    tmp_path: Path, zip_layout: bool, mmap: bool
) -> None:
    path = tmp_path / "state.pt"
    torch.save(_state(), path, _use_new_zipfile_serialization=zip_layout)
    ours = safe_torch_load(str(path), map_location="cpu", mmap=mmap and zip_layout)
    with torch.serialization.safe_globals([argparse.Namespace]):
        theirs = torch.load(path, weights_only=True)
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        got = ours[key]
        if isinstance(expected, torch.Tensor):
            assert type(got) is type(expected), key
            assert got.dtype == expected.dtype and got.shape == expected.shape, key
            assert got.stride() == expected.stride(), key
            assert got.storage_offset() == expected.storage_offset(), key
            assert got.requires_grad == expected.requires_grad, key
            assert torch.equal(got, expected), key
        else:
            assert got == expected, key
    assert ours["param"].tag == "decoder"
    # Views of one storage still share it, as torch's loader gives them.
    assert (
        ours["view"].untyped_storage().data_ptr() == ours["transposed"].untyped_storage().data_ptr()
    )


@pytest.mark.filterwarnings("ignore:.*(quantized|TypedStorage).*:UserWarning")
def test_quantized_tensors_match_torch(tmp_path: Path) -> None:
    x = torch.randn(4, 3)
    state = {
        "per_tensor": torch.quantize_per_tensor(x, 0.1, 3, torch.quint8),
        "per_channel": torch.quantize_per_channel(
            x, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 1, 2, 3]), 0, torch.qint8
        ),
    }
    path = tmp_path / "q.pt"
    torch.save(state, path)
    ours = safe_torch_load(str(path), map_location="cpu")
    theirs = torch.load(path, weights_only=True)
    for key in state:
        assert ours[key].qscheme() == theirs[key].qscheme()
        assert torch.equal(ours[key].int_repr(), theirs[key].int_repr())
        assert torch.equal(ours[key].dequantize(), theirs[key].dequantize())


def test_whole_model_pickles_become_inert_stub_trees(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    path = tmp_path / "model.pt"
    torch.save(model, path)
    stubbed = safe_torch_load(str(path), map_location="cpu", stubs=True)
    assert isinstance(stubbed, StubObject) and not isinstance(stubbed, torch.nn.Module)
    state = tk.load_state_dict(path)
    assert list(state) == list(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    real = safe_torch_load(str(path), map_location="cpu", torch_nn=True)
    x = torch.randn(5, 3)
    assert torch.equal(real.eval()(x), model.eval()(x))


# -- what the machine refuses ----------------------------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _run(data: bytes, **kwargs: Any) -> Any:
    return safe_pickle_load(b"\x80\x02" + data + b".", path="crafted.pkl", **kwargs)


def test_build_on_an_allowlisted_class_is_refused_and_leaves_it_unchanged() -> None:
    before = dict(vars(argparse.Namespace))
    state = b"}X\x0c\x00\x00\x00dump_patchesI01\nsb"  # {'dump_patches': True} then BUILD
    with pytest.raises(tk.UnsafeFileError, match="did not build"):
        _run(_global("argparse", "Namespace") + state)
    assert dict(vars(argparse.Namespace)) == before
    assert not hasattr(argparse.Namespace, "dump_patches")


def test_build_cannot_set_special_attributes_on_instances() -> None:
    # Namespace() then BUILD {'__class__': ...}
    data = _global("argparse", "Namespace") + b")R}X\t\x00\x00\x00__class__K\x01sb"
    with pytest.raises(tk.UnsafeFileError, match="special attribute"):
        _run(data)


def test_keyword_arguments_to_c_constructors_are_refused() -> None:
    # NEWOBJ_EX(torch.Tensor, (), {'cdata': 1}) would crash the process if it ran.
    data = _global("torch", "Tensor") + b")}X\x05\x00\x00\x00cdataK\x01s\x92"
    with pytest.raises(tk.UnsafeFileError, match="keyword arguments"):
        _run(data)


def test_calling_torch_tensor_for_uninitialised_memory_is_refused() -> None:
    data = _global("torch", "Tensor") + b"K\x10\x85R"  # torch.Tensor(16)
    with pytest.raises(tk.UnsafeFileError, match="never calls"):
        _run(data)


def test_filling_objects_the_pickle_did_not_build_is_refused() -> None:
    # SETITEM on the OrderedDict *class* (not an instance).
    data = _global("collections", "OrderedDict") + b"X\x01\x00\x00\x00aK\x01s"
    with pytest.raises(tk.UnsafeFileError, match="did not build"):
        _run(data)


def test_repetition_arguments_are_refused() -> None:
    with pytest.raises(tk.UnsafeFileError, match="bytearray"):
        _run(_global("builtins", "bytearray") + b"J\x00\x00\x00\x7f\x85R")


def test_refusals_name_every_offending_global() -> None:
    data = (
        b"(" + _global("mypkg.models", "Net") + b")R" + _global("os", "system") + b"X\x02\x00"
        b"\x00\x00ls\x85Rl"
    )
    with pytest.raises(tk.UnsafeFileError) as info:
        _run(data, stubs=True)
    assert info.value.globals == ("mypkg.models.Net", "posix.system") or info.value.globals == (
        "mypkg.models.Net",
        "os.system",
    )
    assert "DANGEROUS" in str(info.value)


def _machine(data: bytes, limits: Limits) -> Machine:
    return Machine(data, 0, rules=SafeRules(), persistent_load=None, label="x", limits=limits)


def test_work_and_nesting_are_bounded() -> None:
    many = b"\x80\x02" + b"N0" * 1000 + b"N."
    with pytest.raises(tk.UnsafeFileError, match="opcodes"):
        _machine(many, Limits(max_ops=500)).run()
    deep = b"\x80\x02N" + b"\x85" * 300 + b"."  # 300 nested 1-tuples
    with pytest.raises(tk.UnsafeFileError, match="levels deep"):
        _machine(deep, Limits(max_depth=200)).run()
    memo = b"\x80\x02N" + b"".join(b"r" + i.to_bytes(4, "little") for i in range(50)) + b"."
    with pytest.raises(tk.UnsafeFileError, match="memo"):
        _machine(memo, Limits(max_memo=10)).run()


def test_truncated_and_garbage_pickles_are_corrupt_with_a_position() -> None:
    data = pickle.dumps({"a": [1, 2, 3]}, protocol=2)
    for cut in range(1, len(data)):
        with pytest.raises(tk.CorruptFileError, match="at byte"):
            safe_pickle_load(data[:cut], path="cut.pkl")
    with pytest.raises(tk.CorruptFileError):
        safe_pickle_load(b"\x80\x02\xff.", path="garbage.pkl")


# -- torch zip records -----------------------------------------------------------------------


def _rewrite(path: Path, change: Any) -> None:
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            change(archive, info, data)


def test_a_compressed_record_is_refused_not_read_as_values(tmp_path: Path) -> None:
    path = tmp_path / "deflated.pt"
    torch.save({"w": torch.arange(100.0)}, path)

    def deflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
        method = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
        archive.writestr(info.filename, data, compress_type=method)

    _rewrite(path, deflate)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(100.0))
    for mmap in (False, True):
        with pytest.raises(tk.CorruptFileError, match="compressed"):
            safe_torch_load(str(path), map_location="cpu", mmap=mmap)


def test_a_short_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.pt"
    torch.save({"w": torch.arange(100.0)}, path)

    def shorten(archive: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
        archive.writestr(info.filename, data[:-4] if "/data/" in info.filename else data)

    _rewrite(path, shorten)
    with pytest.raises(tk.CorruptFileError, match="holds 396 bytes"):
        tk.load_state_dict(path)


def test_an_unfilled_legacy_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(8.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    stream = io.BytesIO(data)
    for _ in range(4):  # magic, protocol, system info, the object: walked, never run
        for _op in pickletools.genops(stream):
            pass
    path.write_bytes(data[: stream.tell()] + pickle.dumps([], protocol=2))
    with pytest.raises(tk.CorruptFileError, match="never filled"):
        tk.load_state_dict(path)


def test_big_endian_files_load_with_the_right_values(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    values = torch.arange(6, dtype=torch.float32) * 1.5
    torch.save({"w": values}, path)

    def swap(archive: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
        if info.filename.endswith("/byteorder"):
            data = b"big"
        elif "/data/" in info.filename:
            data = np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
        archive.writestr(info, data)

    _rewrite(path, swap)
    assert torch.equal(torch.load(path, weights_only=True)["w"], values)
    for mmap in (False, True):
        assert torch.equal(safe_torch_load(str(path), map_location="cpu", mmap=mmap)["w"], values)
    assert torch.equal(tk.load_state_dict(path)["w"], values)


# -- classification and scan -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("qualname", "verdict"),
    [
        ("collections.OrderedDict", "safe"),
        ("torch._utils._rebuild_tensor_v2", "safe"),
        ("torch.jit._pickle.build_intlist", "safe"),
        ("os.system", "dangerous"),
        ("posix.system", "dangerous"),
        ("torch.os.system", "dangerous"),
        ("torch.serialization.os.system", "dangerous"),
        ("builtins.getattr", "dangerous"),
        ("builtins.object.__subclasses__", "dangerous"),
        ("numpy.load", "dangerous"),
        ("torch.storage._load_from_bytes", "dangerous"),
        ("some.pkg.run_shell", "unknown"),
        ("some.pkg.system", "dangerous"),
        ("mymodels.Net", "unknown"),
        ("__torch__.Net", "unknown"),
        ("torch.nn.modules.linear.Linear", "unknown"),
    ],
)
def test_globals_are_classified_by_what_they_can_do(qualname: str, verdict: str) -> None:
    assert classify(qualname) == verdict


def test_scan_agrees_with_the_loaders(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(_state(), good)
    assert scan_file(str(good)).verdict == "safe"
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 2))), scripted)
    assert scan_file(str(scripted)).verdict != "dangerous"
    crafted = b"\x80\x02" + _global("argparse", "Namespace") + b"}b."
    result = scan_pickle(crafted, "crafted.pkl")
    assert result.verdict == "dangerous" and result.problem
    with pytest.raises(tk.UnsafeFileError):
        safe_pickle_load(crafted, path="crafted.pkl")


def test_a_stub_runs_nothing() -> None:
    data = pickle.dumps(types.SimpleNamespace(x=1), protocol=2).replace(
        b"types\nSimpleNamespace", b"evil.mod\nThing"
    )
    stub = safe_pickle_load(data, path="stub.pkl", stubs=True)
    assert isinstance(stub, StubObject)
    with pytest.raises(TypeError):
        stub()
    assert type(stub).__module__ == "torchkeep.stubs"


@pytest.mark.parametrize("zip_layout", [True, False])
def test_a_map_location_function_is_applied_to_every_storage(
    tmp_path: Path, zip_layout: bool
) -> None:
    path = tmp_path / "state.pt"
    torch.save(_state(), path, _use_new_zipfile_serialization=zip_layout)
    seen: list[str] = []

    def restore(storage: Any, location: str) -> Any:
        seen.append(location)
        return storage

    ours = safe_torch_load(str(path), map_location=restore)
    theirs = torch.load(path, weights_only=False)
    assert seen
    for key, expected in theirs.items():
        if isinstance(expected, torch.Tensor):
            assert torch.equal(ours[key], expected), key
    assert (
        ours["view"].untyped_storage().data_ptr() == ours["transposed"].untyped_storage().data_ptr()
    )


@pytest.mark.slow
def test_a_module_tree_shared_exponentially_is_refused_not_walked(tmp_path: Path) -> None:
    module: torch.nn.Module = torch.nn.Linear(1, 1)
    for _ in range(25):  # 2**25 paths to the same Linear in a file of a few kilobytes
        parent = torch.nn.Module()
        parent.a = module
        parent.b = module
        module = parent
    path = tmp_path / "shared.pt"
    torch.save(module, path)
    assert path.stat().st_size < 100_000
    with pytest.raises(tk.UnsafeFileError, match="more than 1,000,000 names"):
        tk.load_state_dict(path)
    with pytest.raises(tk.UnsafeFileError, match="more than 1,000,000 names"):
        tk.inspect(path)


def test_a_module_tree_that_contains_itself_is_corrupt(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.add_module("loop", model)
    path = tmp_path / "loop.pt"
    torch.save(model, path)
    with pytest.raises(tk.CorruptFileError, match="contains itself"):
        tk.load_state_dict(path)
