"""Every kind of tensor either round-trips exactly where a format holds it, or is refused with a
typed error naming the formats (or the conversion) that do.

Kinds: sparse (COO, CSR, CSC, BSR, BSC), nested (strided and jagged), quantized (per tensor
and per channel, 8-, 32-bit and packed), every dtype torch has, 0-d, empty, non-contiguous,
widely strided, requires_grad and meta tensors. Paths: save to .safetensors, .pt, legacy .pt
and sharded folders; load_state_dict, load(model, ...) and inspect of each; convert; native and
.pt checkpoints; plain torch.save files read by the checking unpickler. References are
torch.save / torch.load(weights_only=True) and the safetensors library's own functions.
"""

from __future__ import annotations

import collections
import json
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch as st
import torch
from torch import nn

import torchkeep as tk
from torchkeep._tensor_parts import (
    jagged_from_parts,
    nested_from_buffer,
    quantized_from_bytes,
    raw_from_bytes,
    sparse_from_parts,
)
from torchkeep._tensors import DTYPE_FROM_NAME
from torchkeep.safety.unpickle import safe_torch_load
from torchkeep.tools.convert import convert

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(quantized|TypedStorage|ComplexHalf|nested|is_fx_tracing).*:UserWarning"
)

# -- the kinds --------------------------------------------------------------------------------


def _dense() -> torch.Tensor:
    value = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    value[0, 1] = 0
    return value


def _per_channel(dtype: torch.dtype, axis: int = 0) -> torch.Tensor:
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    count = x.shape[axis]
    scales = torch.linspace(0.05, 0.2, count, dtype=torch.float64)
    return torch.quantize_per_channel(x, scales, torch.arange(count) % 3, axis, dtype)


def _quantized(dtype: torch.dtype, scale: float = 0.1, zero: int = 3) -> torch.Tensor:
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    return torch.quantize_per_tensor(x, scale, zero, dtype)


SPARSE: dict[str, Callable[[], torch.Tensor]] = {
    "coo": lambda: _dense().to_sparse(),
    "coo-uncoalesced": lambda: torch.sparse_coo_tensor(
        torch.tensor([[0, 0, 1], [1, 1, 2]]), torch.tensor([1.0, 2.0, 3.0]), (2, 3)
    ),
    "coo-hybrid": lambda: torch.arange(24.0).reshape(3, 4, 2).to_sparse(2),
    "csr": lambda: _dense().to_sparse_csr(),
    "csc": lambda: _dense().to_sparse_csc(),
    "bsr": lambda: torch.arange(16.0).reshape(4, 4).to_sparse_bsr((2, 2)),
    "bsc": lambda: torch.arange(16.0).reshape(4, 4).to_sparse_bsc((2, 2)),
}
QUANTIZED: dict[str, Callable[[], torch.Tensor]] = {
    "qint8": lambda: _quantized(torch.qint8),
    "quint8": lambda: _quantized(torch.quint8, 0.05, 10),
    "qint32": lambda: _quantized(torch.qint32, 0.01, 0),
    "qint8-channel": lambda: _per_channel(torch.qint8),
    "quint8-channel": lambda: _per_channel(torch.quint8, axis=1),
    "qint32-channel": lambda: _per_channel(torch.qint32, axis=1),
    "qint8-view": lambda: torch.quantize_per_tensor(torch.randn(4, 6), 0.1, 2, torch.qint8)[:, ::2],
}
PACKED: dict[str, Callable[[], torch.Tensor]] = {
    "quint4x2": lambda: _quantized(torch.quint4x2),
    "quint2x4": lambda: _quantized(torch.quint2x4, 0.1, 1),
    "quint4x2-float-qparams": lambda: torch.quantize_per_channel(
        torch.randn(4, 3), torch.rand(4) + 0.1, torch.rand(4), 0, torch.quint4x2
    ),
}
NESTED: dict[str, Callable[[], torch.Tensor]] = {
    "nested": lambda: torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)]),
    "nested-transposed": lambda: torch.nested.nested_tensor(
        [torch.arange(6.0).reshape(2, 3), torch.arange(12.0).reshape(4, 3)]
    ).transpose(1, 2),
    "nested-with-empty": lambda: torch.nested.nested_tensor(
        [torch.randn(2, 5), torch.randn(0, 5), torch.randn(3, 5)]
    ),
}


def _jagged() -> torch.Tensor:
    parts = [torch.arange(6.0).reshape(3, 2), torch.arange(10.0).reshape(5, 2)]
    return torch.nested.nested_tensor(parts, layout=torch.jagged)


def _bytes(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` with arbitrary bytes (any dtype, even those without arithmetic)."""
    count = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(
        0, 256, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return raw.view(dtype).reshape(shape)


PLAIN: dict[str, Callable[[], torch.Tensor]] = {
    "0-d": lambda: torch.tensor(3.5),
    "empty": lambda: torch.empty(0, 5),
    "transposed": lambda: torch.arange(20.0).reshape(4, 5).t(),
    "wide-stride": lambda: torch.arange(100_000.0)[::10_000],
    "requires-grad": lambda: torch.ones(3, requires_grad=True),
    "parameter": lambda: nn.Parameter(torch.arange(4.0)),
    "float8-view": lambda: torch.randn(6, 4).to(torch.float8_e5m2)[::2, 1:],
}
# Dtypes safetensors has no name for; torch.save writes them into zip files.
NO_SAFETENSORS: dict[str, Callable[[], torch.Tensor]] = {
    "complex128": lambda: torch.randn(3, dtype=torch.complex128),
    "complex32": lambda: torch.randn(3, dtype=torch.complex64).to(torch.complex32),
    "bits16": lambda: _bytes(torch.bits16, (4,)),
    "bits8": lambda: _bytes(torch.bits8, (2, 2)),
    "bits4x2": lambda: _bytes(torch.bits4x2, (3,)),
    "float4-0d": lambda: _bytes(torch.float4_e2m1fn_x2, ()),
}
LEGACY_DTYPES = set(torch.storage._dtype_to_storage_type_map())  # type: ignore[no-untyped-call]
FORMATS = {
    "safetensors": ("w.safetensors", {}),
    "torch": ("w.pt", {}),
    "torch-legacy": ("legacy.pt", {"format": "torch-legacy"}),
    "sharded": ("shards", {"max_shard_size": 64}),
}


def same(expected: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal kind and values (sparse: layout and dense values; quantized: integers and
    quantizer; nested: each tensor)."""
    if (expected.layout, expected.dtype, expected.is_nested) != (
        got.layout,
        got.dtype,
        got.is_nested,
    ):
        return False
    if expected.is_nested:
        pairs = list(zip(expected.unbind(), got.unbind(), strict=True))
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in pairs)
    if expected.layout != torch.strided:
        coalesced = (
            expected.layout != torch.sparse_coo or expected.is_coalesced() == got.is_coalesced()
        )
        return coalesced and torch.equal(expected.to_dense(), got.to_dense())
    if expected.is_quantized:
        if expected.qscheme() != got.qscheme() or not torch.equal(
            expected.dequantize(), got.dequantize()
        ):
            return False
        if expected.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return (expected.q_scale(), expected.q_zero_point()) == (
                got.q_scale(),
                got.q_zero_point(),
            )
        return (
            torch.equal(expected.q_per_channel_scales(), got.q_per_channel_scales())
            and torch.equal(expected.q_per_channel_zero_points(), got.q_per_channel_zero_points())
            and expected.q_per_channel_axis() == got.q_per_channel_axis()
            and (
                expected.dtype in (torch.quint4x2, torch.quint2x4)
                or torch.equal(expected.int_repr(), got.int_repr())
            )
        )
    return expected.shape == got.shape and torch.equal(
        expected.detach().contiguous().reshape(-1).view(torch.uint8),
        got.contiguous().reshape(-1).view(torch.uint8),
    )


def _holds(error: pytest.ExceptionInfo[BaseException], *places: str) -> None:
    message = str(error.value)
    for place in places:
        assert place in message, (place, message)


# -- safetensors: every dtype both sides name, byte-compatible with the safetensors library -----

SHAPES = [(2, 4), (3,), (0, 3), (1, 1, 2)]


def _header(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length])


@pytest.mark.parametrize("code", sorted(DTYPE_FROM_NAME))
def test_safetensors_dtypes_match_the_safetensors_library(code: str, tmp_path: Path) -> None:
    dtype = DTYPE_FROM_NAME[code]
    state = {f"t{i}": _bytes(dtype, shape, seed=i) for i, shape in enumerate(SHAPES)}
    if dtype != torch.float4_e2m1fn_x2:
        state["scalar"] = _bytes(dtype, ())
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    tk.save(state, ours)
    st.save_file(state, theirs)
    # Each side reads the other's file to the same bytes, dtype and shape.
    for name, expected in state.items():
        assert same(expected, st.load_file(ours)[name]), name
        assert same(expected, tk.load_state_dict(theirs)[name]), name
        assert same(expected, tk.load_state_dict(ours)[name]), name
    # The header entries (dtype code and shape, float4 counting 4-bit values) are the same.
    mine, reference = _header(ours), _header(theirs)
    for name in state:
        assert mine[name]["dtype"] == reference[name]["dtype"] == code  # type: ignore[index]
        assert mine[name]["shape"] == reference[name]["shape"]  # type: ignore[index]
    infos = {t.name: t for t in tk.inspect(ours).tensors}
    assert all(
        infos[n].shape == tuple(t.shape) and infos[n].dtype == str(dtype)[6:]
        for n, t in state.items()
    )


@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E8M0", "F4", "U64", "C64", "BOOL"])
def test_sharded_folders_hold_every_safetensors_dtype(code: str, tmp_path: Path) -> None:
    dtype = DTYPE_FROM_NAME[code]
    state = {f"t{i}": _bytes(dtype, (4, 8), seed=i) for i in range(3)}
    folder = tk.save(state, tmp_path / "shards", max_shard_size=40)
    shards = sorted(Path(folder).glob("*.safetensors"))
    assert len(shards) == 3
    loaded = tk.load_state_dict(folder)
    from_library = {k: v for shard in shards for k, v in st.load_file(shard).items()}
    for name, expected in state.items():
        assert same(expected, loaded[name]) and same(expected, from_library[name])


@pytest.mark.parametrize("kind", sorted(NO_SAFETENSORS))
@pytest.mark.parametrize("fmt", ["safetensors", "sharded"])
def test_dtypes_safetensors_cannot_name_are_refused_naming_pt(
    kind: str, fmt: str, tmp_path: Path
) -> None:
    value = NO_SAFETENSORS[kind]()
    # The safetensors library cannot write them either.
    with pytest.raises(Exception):  # noqa: B017 - its errors are untyped
        st.save_file({"t": value}, tmp_path / "lib.safetensors")
    path, options = FORMATS[fmt]
    with pytest.raises(tk.UnsupportedTensorError, match="safetensors cannot store") as error:
        tk.save({"t": value, "w": torch.ones(2)}, tmp_path / path, **options)  # type: ignore[arg-type]
    _holds(error, "'t'", str(value.dtype)[6:], ".pt files (torch zip)")
    assert not (tmp_path / path).exists()


@pytest.mark.parametrize(
    "shape, count, problem",
    [([3], 2, "not whole bytes"), ([], 1, "not whole bytes"), ([2, 3], 3, "no torch form")],
)
def test_float4_headers_torch_cannot_hold_are_refused(
    shape: list[int], count: int, problem: str, tmp_path: Path
) -> None:
    header = json.dumps({"t": {"dtype": "F4", "shape": shape, "data_offsets": [0, count]}}).encode()
    path = tmp_path / "f4.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x11" * count)
    with pytest.raises(Exception):  # noqa: B017 - the library refuses too, untyped
        st.load_file(path)
    with pytest.raises(tk.CorruptFileError, match=problem):
        tk.load_state_dict(path)


# -- every format: plain tensors of every shape, stride and flag ------------------------------


@pytest.mark.parametrize(
    "kind, fmt",
    # float8 in legacy files: test_legacy_files_take_only_what_torch_reads_back.
    [
        (k, f)
        for k in sorted(PLAIN)
        for f in sorted(FORMATS)
        if (k, f) != ("float8-view", "torch-legacy")
    ],
)
def test_plain_tensors_round_trip_in_every_format(kind: str, fmt: str, tmp_path: Path) -> None:
    value = PLAIN[kind]()
    path, options = FORMATS[fmt]
    written = tk.save({"t": value, "w": torch.ones(2)}, tmp_path / path, **options)  # type: ignore[arg-type]
    loaded = tk.load_state_dict(written)["t"]
    assert same(value, loaded) and loaded.is_contiguous() and not loaded.requires_grad
    if fmt in ("torch", "torch-legacy"):
        assert same(value, torch.load(written, weights_only=True)["t"])
    info = next(t for t in tk.inspect(written).tensors if t.name == "t")
    assert (info.shape, info.layout, info.nbytes) == (
        tuple(value.shape),
        "strided",
        value.numel() * value.element_size(),
    )
    model = nn.Module()
    model.register_buffer("t", torch.zeros_like(value.detach().contiguous()))
    model.register_buffer("w", torch.zeros(2))
    tk.load(model, written)
    assert same(value, model.t)


ALL_DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str)
QUANTIZED_DTYPES = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
TORCH_SAVES = LEGACY_DTYPES | set(torch.storage._new_dtypes())  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("dtype", [d for d in ALL_DTYPES if d not in QUANTIZED_DTYPES], ids=str)
def test_every_dtype_round_trips_in_pt_files(dtype: torch.dtype, tmp_path: Path) -> None:
    value = _bytes(dtype, (2, 3))
    path = tmp_path / "w.pt"
    if dtype not in TORCH_SAVES:
        # torch.save has no storage for these (int1..int7, uint1..uint7); neither has torchkeep.
        with pytest.raises(KeyError):
            torch.save({"t": value}, tmp_path / "torch.pt")
        with pytest.raises(tk.UnsupportedTensorError, match=r"view\(torch.uint8\)") as error:
            tk.save({"t": value}, path)
        _holds(error, "checkpoint folders (torchkeep.save_checkpoint)")
        return
    tk.save({"t": value}, path)
    assert same(value, torch.load(path, weights_only=True)["t"])
    assert same(value, tk.load_state_dict(path)["t"])
    torch.save({"t": value}, tmp_path / "torch.pt")
    assert same(value, tk.load_state_dict(tmp_path / "torch.pt")["t"])


@pytest.mark.parametrize("dtype", sorted(TORCH_SAVES - QUANTIZED_DTYPES, key=str), ids=str)
def test_legacy_files_take_only_what_torch_reads_back(dtype: torch.dtype, tmp_path: Path) -> None:
    value = _bytes(dtype, (2, 3))
    path = tmp_path / "legacy.pt"
    if dtype in LEGACY_DTYPES:
        tk.save({"t": value}, path, format="torch-legacy")
        assert same(value, torch.load(path, weights_only=True)["t"])
        assert same(value, tk.load_state_dict(path)["t"])
        return
    # torch writes them, but its legacy reader fails on them...
    torch.save({"t": value}, tmp_path / "torch.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(AttributeError):
        torch.load(tmp_path / "torch.pt", weights_only=True)
    # ...so torchkeep does not write them there, naming what holds them,
    with pytest.raises(
        tk.UnsupportedTensorError, match="a legacy torch file cannot store"
    ) as error:
        tk.save({"t": value}, path, format="torch-legacy")
    _holds(error, ".pt files (torch zip)")
    # and still reads what torch wrote.
    assert same(value, tk.load_state_dict(tmp_path / "torch.pt")["t"])


# -- sparse, quantized, nested: the checking unpickler against torch.load ----------------------

PICKLED = {**SPARSE, **QUANTIZED, **PACKED, **NESTED, **NO_SAFETENSORS}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", sorted(PICKLED))
def test_torch_save_files_load_as_torch_loads_them(kind: str, legacy: bool, tmp_path: Path) -> None:
    value = PICKLED[kind]()
    path = tmp_path / "t.pt"
    torch.save({"t": value}, path, _use_new_zipfile_serialization=not legacy)
    ours = safe_torch_load(str(path), map_location="cpu")["t"]
    assert same(value, ours)
    try:
        theirs = torch.load(path, weights_only=True)["t"]
    except (RuntimeError, AttributeError):
        # torch's legacy reader fails on nested tensors and on dtypes without a typed storage
        # class (it builds them before their storages are filled, or asks an untyped storage
        # for its dtype); torchkeep reads them.
        assert legacy and (value.is_nested or value.dtype not in LEGACY_DTYPES)
    else:
        assert same(theirs, ours)
    # Read without data (inspect): kind, shape and dtype are there.
    info = next(t for t in tk.inspect(path).tensors if t.name == "t")
    assert info.dtype == str(value.dtype)[6:]
    if value.is_nested:
        assert (info.layout, info.shape) == ("nested", (value.size(0),))
    else:
        assert (info.layout, info.shape) == (str(value.layout)[6:], tuple(value.shape))


@pytest.mark.slow
def test_jagged_tensors_are_refused_as_torch_refuses_them(tmp_path: Path) -> None:
    path = tmp_path / "jagged.pt"
    torch.save({"t": _jagged()}, path)
    with pytest.raises(tk.UnsafeFileError, match="jagged layout") as error:
        tk.load_state_dict(path)
    _holds(error, "trust=True", "torch.nested.nested_tensor(list(t.unbind()))")
    assert "DANGEROUS" not in str(error.value)
    with pytest.raises(tk.UnsafeFileError, match="jagged layout"):
        tk.inspect(path)
    # torch.load(weights_only=True) refuses it too, in a fresh interpreter.
    script = f"import torch; torch.load({str(path)!r}, weights_only=True)"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "must be imported to load nested jagged tensors" in done.stderr
    assert same(_jagged(), tk.load_state_dict(path, trust=True)["t"])


def test_meta_tensors_are_refused_everywhere(tmp_path: Path) -> None:
    meta = torch.empty(2, 3, device="meta")
    for fmt, (path, options) in FORMATS.items():
        with pytest.raises(tk.InvalidStateError, match="meta device and has no data"):
            tk.save({"m": meta}, tmp_path / path, **options)  # type: ignore[arg-type]
        assert not (tmp_path / path).exists(), fmt
    with pytest.raises(tk.UnsupportedValueError, match="meta tensor"):
        tk.save_checkpoint(tmp_path / "ckpt", extra={"m": meta}, rng=False)
    torch.save({"m": meta}, tmp_path / "meta.pt")
    assert torch.load(tmp_path / "meta.pt", weights_only=True)["m"].is_meta
    with pytest.raises(tk.CorruptFileError, match="meta tensor"):
        tk.load_state_dict(tmp_path / "meta.pt")


def test_damaged_sparse_indices_are_refused_where_torch_loads_them(tmp_path: Path) -> None:
    bad = torch.sparse_coo_tensor(
        torch.tensor([[0, 7], [1, 1]]), torch.tensor([1.0, 2.0]), (2, 2), check_invariants=False
    )
    path = tmp_path / "bad.pt"
    torch.save({"t": bad}, path)
    torch.load(path, weights_only=True)  # torch checks invariants only when asked
    with pytest.raises(tk.CorruptFileError, match="size is inconsistent with indices"):
        tk.load_state_dict(path)


@pytest.mark.parametrize(
    "build, problem",
    [
        (
            lambda: sparse_from_parts(
                torch.sparse_coo, [torch.tensor([[5], [0]]), torch.ones(1)], (2, 2)
            ),
            "inconsistent",
        ),
        (
            lambda: sparse_from_parts(torch.sparse_coo, [torch.ones(2, 1), torch.ones(1)], (2, 2)),
            "not integer",
        ),
        (lambda: sparse_from_parts(torch.strided, [torch.zeros(1)], (1,)), "not a sparse layout"),
        (
            lambda: sparse_from_parts(
                torch.sparse_csr,
                [torch.tensor([0, 2, 1]), torch.tensor([0, 1]), torch.ones(2)],
                (2, 2),
            ),
            "crow_indices",
        ),
        (
            lambda: nested_from_buffer(
                torch.zeros(4),
                torch.tensor([[3], [2]]),
                torch.tensor([[1], [1]]),
                torch.tensor([0, 3]),
            ),
            "reaches element 4",
        ),
        (
            lambda: nested_from_buffer(
                torch.zeros(4), torch.tensor([[3]]), torch.tensor([[-1]]), torch.tensor([2])
            ),
            "negative",
        ),
        (
            lambda: nested_from_buffer(
                torch.zeros(4, 1), torch.tensor([[1]]), torch.tensor([[1]]), torch.tensor([0])
            ),
            "disagree",
        ),
        (
            lambda: jagged_from_parts(torch.zeros(4, 2), torch.tensor([0, 3, 5]), None, 1),
            "outside its 4",
        ),
        (lambda: jagged_from_parts(torch.zeros(4, 2), torch.tensor([0, 3, 2]), None, 1), "outside"),
        (
            lambda: jagged_from_parts(
                torch.zeros(4, 2), torch.tensor([0, 2]), torch.tensor([5]), 1
            ),
            "outside",
        ),
        (
            lambda: jagged_from_parts(torch.zeros(4, 2), torch.tensor([0, 2]), None, 3),
            "ragged dimension",
        ),
        (
            lambda: quantized_from_bytes(
                torch.zeros(3, dtype=torch.uint8),
                {
                    "dtype": torch.qint8,
                    "shape": [2, 2],
                    "qscheme": torch.per_tensor_affine,
                    "scale": 0.1,
                    "zero_point": 0,
                },
            ),
            "needs 4 bytes",
        ),
        (
            lambda: quantized_from_bytes(
                torch.zeros(4, dtype=torch.uint8),
                {
                    "dtype": torch.qint8,
                    "shape": [2, 2],
                    "qscheme": torch.per_channel_affine,
                    "scale": torch.ones(3, dtype=torch.float64),
                    "zero_point": torch.zeros(3, dtype=torch.long),
                    "axis": 0,
                },
            ),
            "channels",
        ),
        (
            lambda: raw_from_bytes(torch.zeros(15, dtype=torch.uint8), torch.complex128, [1]),
            "do not hold",
        ),
    ],
)
def test_parts_from_files_are_checked_before_torch_sees_them(
    build: Callable[[], torch.Tensor], problem: str
) -> None:
    with pytest.raises(tk.CorruptFileError, match=problem):
        build()


# -- torchkeep.save / load / inspect of sparse, quantized and nested tensors -------------------

SAVED_TO_PT = {**QUANTIZED, **NESTED, **SPARSE, **PACKED}


@pytest.mark.parametrize("kind", sorted(SAVED_TO_PT))
def test_structured_tensors_round_trip_in_pt_files(kind: str, tmp_path: Path) -> None:
    value = SAVED_TO_PT[kind]()
    path = tk.save({"t": value, "w": torch.ones(2)}, tmp_path / "w.pt")
    assert same(value, torch.load(path, weights_only=True)["t"])
    assert same(value, tk.load_state_dict(path)["t"])


@pytest.mark.parametrize(
    "kind",
    [k for k in sorted(SAVED_TO_PT) if k not in NESTED],
)
def test_sparse_and_quantized_round_trip_in_legacy_files(kind: str, tmp_path: Path) -> None:
    value = SAVED_TO_PT[kind]()
    path = tk.save({"t": value}, tmp_path / "legacy.pt", format="torch-legacy")
    assert same(value, torch.load(path, weights_only=True)["t"])
    assert same(value, tk.load_state_dict(path)["t"])


STRUCTURED = {**SPARSE, **QUANTIZED, **PACKED, **NESTED, "jagged": _jagged}


@pytest.mark.parametrize("kind", sorted(STRUCTURED))
@pytest.mark.parametrize("fmt", ["safetensors", "sharded"])
def test_structured_tensors_are_refused_by_safetensors_naming_what_holds_them(
    kind: str, fmt: str, tmp_path: Path
) -> None:
    value = STRUCTURED[kind]()
    with pytest.raises(Exception):  # noqa: B017 - the library refuses them too, untyped
        st.save_file({"t": value}, tmp_path / "lib.safetensors")
    path, options = FORMATS[fmt]
    with pytest.raises(tk.UnsupportedTensorError, match="safetensors cannot store") as error:
        tk.save({"t": value}, tmp_path / path, **options)  # type: ignore[arg-type]
    if kind == "jagged":
        _holds(
            error,
            "only checkpoint folders (torchkeep.save_checkpoint)",
            "nested_tensor(list(t.unbind()))",
        )
    elif kind in NESTED:
        _holds(error, ".pt files (torch zip)", ".unbind()")
    else:
        _holds(
            error,
            ".pt files (torch zip)",
            "legacy .pt files",
            ".to_dense()" if kind in SPARSE else ".int_repr()",
        )
    assert not (tmp_path / path).exists()


@pytest.mark.parametrize("kind", sorted(NESTED))
def test_nested_tensors_are_refused_by_legacy_files(kind: str, tmp_path: Path) -> None:
    with pytest.raises(
        tk.UnsupportedTensorError, match="a legacy torch file cannot store"
    ) as error:
        tk.save({"t": NESTED[kind]()}, tmp_path / "legacy.pt", format="torch-legacy")
    _holds(error, "only .pt files (torch zip) and checkpoint folders")
    assert not (tmp_path / "legacy.pt").exists()


@pytest.mark.parametrize("fmt", ["torch", "torch-legacy"])
def test_jagged_tensors_are_refused_by_pt_files(fmt: str, tmp_path: Path) -> None:
    with pytest.raises(tk.UnsupportedTensorError, match="jagged") as error:
        tk.save({"t": _jagged()}, tmp_path / "w.pt", format=fmt)
    _holds(error, "checkpoint folders (torchkeep.save_checkpoint)")


@pytest.mark.parametrize("kind", sorted({**SPARSE, **QUANTIZED}))
def test_load_copies_into_model_tensors_of_the_same_kind(kind: str, tmp_path: Path) -> None:
    value = {**SPARSE, **QUANTIZED}[kind]()
    path = tmp_path / "w.pt"
    torch.save({"t": value}, path)
    model = nn.Module()
    if value.is_quantized and value.qscheme() == torch.per_tensor_affine:
        start = torch.quantize_per_tensor(torch.zeros(value.shape), 1.0, 0, value.dtype)
    else:
        start = value.clone() * 2 if not value.is_quantized else value.clone()
    model.register_buffer("t", start)
    report = tk.load(model, path)
    assert report.loaded == ("t",) and same(value, model.t)


@pytest.mark.parametrize("kind", sorted({**SPARSE, **QUANTIZED, **PACKED}))
def test_load_refuses_to_copy_between_kinds(kind: str, tmp_path: Path) -> None:
    value = {**SPARSE, **QUANTIZED, **PACKED}[kind]()
    path = tmp_path / "w.pt"
    torch.save({"t": value}, path)
    model = nn.Module()
    model.register_buffer("t", torch.zeros(value.shape))
    with pytest.raises(
        tk.UnsupportedTensorError, match="one cannot be copied into the other"
    ) as error:
        tk.load(model, path)
    _holds(error, "'t'", "load_state_dict")
    assert torch.equal(model.t, torch.zeros(value.shape))


def test_packed_float4_is_kept_by_dtype_casts_and_never_cast_into_a_model(
    tmp_path: Path,
) -> None:
    packed = _bytes(torch.float4_e2m1fn_x2, (2, 2))
    path = tk.save({"f4": packed, "w": torch.ones(2)}, tmp_path / "w.safetensors")
    loaded = tk.load_state_dict(path, dtype=torch.bfloat16)
    assert same(packed, loaded["f4"]) and loaded["w"].dtype == torch.bfloat16
    model = nn.Module()
    model.register_buffer("f4", torch.zeros(2, 2, dtype=torch.bfloat16))
    model.register_buffer("w", torch.zeros(2))
    with pytest.raises(tk.UnsupportedTensorError, match="file's dtype, float4_e2m1fn_x2"):
        tk.load(model, path)


def test_load_copies_nested_tensors_into_nested_model_tensors(tmp_path: Path) -> None:
    value = NESTED["nested"]()
    torch.save({"t": value}, tmp_path / "w.pt")
    model = nn.Module()
    model.register_buffer("t", value * 2)
    tk.load(model, tmp_path / "w.pt")
    assert same(value, model.t)


# -- convert ----------------------------------------------------------------------------------

CONVERTED = {**SPARSE, **QUANTIZED, **PACKED, **NESTED, **NO_SAFETENSORS, **PLAIN}


def _holders(value: torch.Tensor) -> set[str]:
    if value.is_nested:
        return {"torch"}
    if value.layout != torch.strided or value.is_quantized:
        return {"torch", "torch-legacy"}
    formats = {"torch"} | ({"torch-legacy"} if value.dtype in LEGACY_DTYPES else set())
    if value.dtype in DTYPE_FROM_NAME.values() and not (
        value.dtype == torch.float4_e2m1fn_x2 and value.dim() == 0
    ):
        formats |= {"safetensors", "sharded"}
    return formats


@pytest.mark.parametrize("kind", sorted(CONVERTED))
def test_convert_keeps_each_kind_or_refuses_it(kind: str, tmp_path: Path) -> None:
    value = CONVERTED[kind]()
    source = tmp_path / "source.pt"
    torch.save({"t": value, "w": torch.ones(3)}, source)
    for fmt, path in [
        ("safetensors", "o.safetensors"),
        ("torch", "o.pt"),
        ("torch-legacy", "l.pt"),
        ("sharded", "o"),
    ]:
        options = {"max_shard_size": 16} if fmt == "sharded" else {}
        if fmt in _holders(value):
            convert(source, tmp_path / path, format=fmt, **options)  # type: ignore[arg-type]
            assert same(value, tk.load_state_dict(tmp_path / path)["t"]), fmt
            if fmt == "safetensors":
                assert same(value, st.load_file(tmp_path / path)["t"])
        else:
            with pytest.raises(tk.UnsupportedTensorError, match="'t'.*cannot store"):
                convert(source, tmp_path / path, format=fmt, **options)  # type: ignore[arg-type]
            assert not (tmp_path / path).exists(), fmt


def test_convert_casts_sparse_values_and_keeps_packed_float4(tmp_path: Path) -> None:
    sparse, packed = SPARSE["csr"](), _bytes(torch.float4_e2m1fn_x2, (2, 2))
    torch.save({"s": sparse, "f4": packed}, tmp_path / "source.pt")
    result = convert(tmp_path / "source.pt", tmp_path / "out.pt", dtype="bfloat16")
    loaded = tk.load_state_dict(tmp_path / "out.pt")
    assert result.cast == ("s",)
    assert loaded["s"].layout == torch.sparse_csr and loaded["s"].dtype == torch.bfloat16
    assert torch.equal(loaded["s"].to_dense(), sparse.to_dense().to(torch.bfloat16))
    assert same(packed, loaded["f4"])


# -- checkpoints --------------------------------------------------------------------------------

IN_CHECKPOINTS = {
    **SPARSE,
    **QUANTIZED,
    **PACKED,
    **NESTED,
    **NO_SAFETENSORS,
    **PLAIN,
    "jagged": _jagged,
    "jagged-with-lengths": lambda: torch.nested.nested_tensor_from_jagged(
        torch.arange(20.0).reshape(10, 2), torch.tensor([0, 4, 8]), torch.tensor([3, 2])
    ),
    "jagged-transposed": lambda: _jagged().transpose(1, 2),
    "int4": lambda: _bytes(torch.int4, (3,)),
    "coo-requires-grad": lambda: SPARSE["coo"]().requires_grad_(),
}


@pytest.mark.parametrize("kind", sorted(IN_CHECKPOINTS))
def test_native_checkpoints_hold_every_kind_without_pickle(kind: str, tmp_path: Path) -> None:
    value = IN_CHECKPOINTS[kind]()
    tk.save_checkpoint(tmp_path / "ckpt", extra={"t": value, "again": value}, rng=False)
    assert not (tmp_path / "ckpt" / "objects.pkl").exists()
    loaded = tk.load_checkpoint(tmp_path / "ckpt", verify=True)["extra"]
    assert same(value, loaded["t"]) and same(value, loaded["again"])
    assert loaded["t"].requires_grad == value.requires_grad


@pytest.mark.parametrize("kind", sorted(IN_CHECKPOINTS))
def test_pt_checkpoints_hold_what_torch_files_hold(kind: str, tmp_path: Path) -> None:
    value = IN_CHECKPOINTS[kind]()
    path = tmp_path / "ckpt.pt"
    if kind.startswith("jagged") or kind == "int4":
        with pytest.raises(tk.UnsupportedTensorError, match="only checkpoint folders") as error:
            tk.save_checkpoint(path, extra={"t": value}, rng=False)
        _holds(error, "'extra.t'")
        assert not path.exists()
        return
    tk.save_checkpoint(path, extra={"t": value}, rng=False)
    loaded = tk.load_checkpoint(path)["extra"]["t"]
    assert same(value, loaded)
    assert same(value, torch.load(path, weights_only=True)["extra"]["t"])


def test_numpy_complex_arrays_come_back_as_arrays(tmp_path: Path) -> None:
    array = np.arange(4, dtype=np.complex128) * (1 + 2j)
    tk.save_checkpoint(tmp_path / "ckpt", extra={"a": array}, rng=False)
    loaded = tk.load_checkpoint(tmp_path / "ckpt")["extra"]["a"]
    assert isinstance(loaded, np.ndarray) and loaded.dtype == array.dtype
    assert np.array_equal(loaded, array)


def test_a_damaged_sparse_part_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    tk.save_checkpoint(tmp_path / "ckpt", extra={"s": SPARSE["coo"]()}, rng=False)
    manifest = tmp_path / "ckpt" / "checkpoint.json"
    document = json.loads(manifest.read_text())
    document["state"]["extra"]["value"]["s"]["size"] = [1, 1]
    manifest.write_text(json.dumps(document))
    with pytest.raises(tk.CorruptFileError, match=r"extra\.s.*inconsistent"):
        tk.load_checkpoint(tmp_path / "ckpt")


class _BadZeroPoints:
    """Pickles a per-channel quantized tensor whose zero points lie outside qint8's range."""

    def __init__(self, zeros: list[int]) -> None:
        self.zeros = zeros

    def __reduce__(self) -> tuple[object, ...]:
        storage = torch.storage.TypedStorage(
            wrap_storage=torch.zeros(4, dtype=torch.int8).untyped_storage(),
            dtype=torch.qint8,
            _internal=True,
        )
        params = (
            torch.per_channel_affine,
            torch.ones(2, dtype=torch.float64),
            torch.tensor(self.zeros),
            0,
        )
        return (
            torch._utils._rebuild_qtensor,
            (storage, 0, (2, 2), (2, 1), params, False, collections.OrderedDict()),
        )


def test_per_channel_zero_points_outside_the_dtype_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.pt"
    torch.save({"q": _BadZeroPoints([0, 3840])}, path)
    # torch builds the tensor and fails only when it is used
    loaded = torch.load(path, weights_only=True)["q"]
    with pytest.raises(RuntimeError, match="zero_point"):
        loaded.dequantize()
    with pytest.raises(tk.CorruptFileError, match="zero point"):
        tk.load_state_dict(path)
    torch.save({"q": _BadZeroPoints([0, 5])}, path)
    assert torch.equal(tk.load_state_dict(path)["q"].int_repr(), loaded.int_repr())


class _BadPerTensor:
    """Pickles a per-tensor quantized tensor with the given scale and zero point."""

    def __init__(self, scale: float, zero: int) -> None:
        self.scale, self.zero = scale, zero

    def __reduce__(self) -> tuple[object, ...]:
        storage = torch.storage.TypedStorage(
            wrap_storage=torch.zeros(4, dtype=torch.uint8).untyped_storage(),
            dtype=torch.quint8,
            _internal=True,
        )
        params = (torch.per_tensor_affine, self.scale, self.zero)
        return (
            torch._utils._rebuild_qtensor,
            (storage, 0, (2, 2), (2, 1), params, False, collections.OrderedDict()),
        )


@pytest.mark.parametrize(
    ("scale", "zero", "why"),
    [(0.1, 300, "zero point is 300"), (0.1, 1 << 70, "zero point"), (float("nan"), 3, "scale")],
)
def test_per_tensor_quantizer_parameters_are_checked(
    tmp_path: Path, scale: float, zero: int, why: str
) -> None:
    path = tmp_path / "q.pt"
    torch.save({"q": _BadPerTensor(scale, zero)}, path)
    with pytest.raises(tk.CorruptFileError, match=why):
        tk.load_state_dict(path)
    torch.save({"q": _BadPerTensor(0.5, 7)}, path)
    good = tk.load_state_dict(path)["q"]
    assert good.q_zero_point() == 7 and good.q_scale() == 0.5


def test_dtypes_without_a_typed_storage_load_without_warnings(tmp_path: Path) -> None:
    """bits16, float8 and uint16 are pickled through _rebuild_tensor_v3 on a typed storage:
    reading them must not touch torch's deprecated TypedStorage API (its warning, made an
    error by -W error, would fail the load)."""
    state = {
        "a": torch.arange(4, dtype=torch.float32),
        "bits": torch.arange(3, dtype=torch.int16).view(torch.bits16),
        "f8": torch.ones(2).to(torch.float8_e4m3fn),
        "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
    }
    path = tmp_path / "exotic.pt"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tk.load_state_dict(path)
    expected = torch.load(path, weights_only=True)
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_a_tensor_torch_cannot_build_here_is_not_called_damage(tmp_path: Path) -> None:
    """Under torch.use_deterministic_algorithms(True) torch fills every new tensor, which it
    cannot do for bits16: torch.load fails, and so does the load, saying why and what to do,
    not that the file is damaged. With the fill turned off, both load it."""
    path = tmp_path / "bits.pt"
    torch.save({"bits": torch.arange(3, dtype=torch.int16).view(torch.bits16)}, path)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(NotImplementedError):
            torch.load(path, weights_only=True)
        with pytest.raises(tk.UnsupportedTensorError, match="cannot build") as caught:
            tk.load_state_dict(path)
        assert not isinstance(caught.value, tk.CorruptFileError)
        assert "fill_uninitialized_memory = False" in str(caught.value)
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        got = tk.load_state_dict(path)
        expected = torch.load(path, weights_only=True)
        assert torch.equal(got["bits"].view(torch.int16), expected["bits"].view(torch.int16))
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
        torch.use_deterministic_algorithms(False)
