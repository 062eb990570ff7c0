"""Tensor facts shared by the formats: dtype names, kinds, raw bytes, checksums, aliasing."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from torchkeep.errors import (
    CorruptFileError,
    InvalidStateError,
    TorchkeepError,
    UnsupportedTensorError,
)

# safetensors' dtype names; only those this torch build has are kept. F4 counts 4-bit values:
# torch's float4_e2m1fn_x2 packs two of them into each element, so a file's last dimension is
# twice torch's (the convention of the safetensors library itself).
_SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
    "C64": "complex64",
}
DTYPE_FROM_NAME: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _SAFETENSORS_DTYPES.items() if hasattr(torch, name)
}
NAME_FROM_DTYPE: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPE_FROM_NAME.items()}
# Two float4 values per element; None where this torch lacks the dtype.
FLOAT4: torch.dtype | None = getattr(torch, "float4_e2m1fn_x2", None)

# The dtypes torch's legacy layout names by a typed storage class: torch.load reads no other
# dtype back from a legacy file.
_LEGACY_DTYPES = frozenset(torch.storage._dtype_to_storage_type_map())  # type: ignore[no-untyped-call]

# Where a tensor can be written, and how messages name each place.
SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
CHECKPOINT = "checkpoint"
_PLACES = {
    SAFETENSORS: ".safetensors files (and sharded folders)",
    TORCH_ZIP: ".pt files (torch zip)",
    TORCH_LEGACY: "legacy .pt files (format='torch-legacy')",
    CHECKPOINT: "checkpoint folders (torchkeep.save_checkpoint)",
}
_SHORT = {
    SAFETENSORS: "safetensors",
    TORCH_ZIP: "a torch zip file",
    TORCH_LEGACY: "a legacy torch file",
    CHECKPOINT: "a checkpoint folder",
}
# The format names callers pass (save's format=, the registry's) -> the place they write.
_FORMAT_PLACE = {
    "safetensors": SAFETENSORS,
    "sharded": SAFETENSORS,
    "torch": TORCH_ZIP,
    "torch-zip": TORCH_ZIP,
    "torch-legacy": TORCH_LEGACY,
    "checkpoint": CHECKPOINT,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a file says about one tensor, read without its data.

    Attributes:
        name: the tensor's flat name.
        shape: its shape. A sparse tensor has its dense shape; a nested tensor ``(n,)``, the
            number of tensors it holds.
        dtype: its dtype, as torch spells it without the ``torch.`` prefix (``float32``).
        nbytes: the size of its data in bytes (for sparse and nested tensors, of what is
            stored: indices, values, offsets).
        layout: ``"strided"`` for dense tensors (quantized ones too: their dtype says so);
            otherwise the layout as torch names it without ``torch.`` (``"sparse_coo"``,
            ``"sparse_csr"``, ...), ``"nested"`` or ``"jagged"`` for nested tensors.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    layout: str = "strided"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# -- kinds ------------------------------------------------------------------------------------

_STANDS_FOR = "_torchkeep_stands_for"


@dataclass(frozen=True)
class _StandIn:
    dtype: torch.dtype
    nbytes: int
    layout: str


def stand_in(
    shape: tuple[int, ...], dtype: torch.dtype, nbytes: int, layout: str = "strided"
) -> torch.Tensor:
    """A meta tensor standing for one torch cannot make without data, read on the meta device.

    ``inspect`` reads files on the meta device, where torch has no quantized tensors, and a
    nested tensor's sizes are data it does not read: the stand-in has the shape that is known
    (``(n,)`` for a nested tensor of ``n`` tensors) and carries the dtype, bytes and layout
    :func:`tensor_info` reports.
    """
    tensor = torch.empty(shape, dtype=torch.uint8, device="meta")
    setattr(tensor, _STANDS_FOR, _StandIn(dtype, nbytes, layout))
    return tensor


def _stands_for(tensor: torch.Tensor) -> _StandIn | None:
    found = getattr(tensor, _STANDS_FOR, None)
    return found if isinstance(found, _StandIn) else None


def is_nested(tensor: torch.Tensor) -> bool:
    """A nested tensor (strided or jagged), or the stand-in for one read on the meta device."""
    standing = _stands_for(tensor)
    return bool(tensor.is_nested) or (standing is not None and standing.layout == "nested")


def layout_name(tensor: torch.Tensor) -> str:
    """``"strided"``, ``"sparse_coo"``, ``"sparse_csr"``, ..., ``"nested"`` or ``"jagged"``."""
    standing = _stands_for(tensor)
    if standing is not None:
        return standing.layout
    if tensor.is_nested:
        return "jagged" if tensor.layout == torch.jagged else "nested"
    return str(tensor.layout).removeprefix("torch.")


def is_plain(tensor: torch.Tensor) -> bool:
    """Dense, strided and not quantized: one block of elements a format can copy as bytes."""
    return (
        tensor.layout == torch.strided
        and not tensor.is_nested
        and not tensor.is_quantized
        and _stands_for(tensor) is None
    )


def sparse_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A sparse tensor's stored tensors: (indices, values) for COO, else (compressed indices,
    plain indices, values)."""
    if tensor.layout == torch.sparse_coo:
        return tensor._indices(), tensor._values()
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        return tensor.crow_indices(), tensor.col_indices(), tensor.values()
    return tensor.ccol_indices(), tensor.row_indices(), tensor.values()


def jagged_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A jagged nested tensor's (values, offsets, lengths or None)."""
    jagged: Any = tensor  # torch.nested's NestedTensor: attributes plain tensors do not have
    return jagged._values, jagged._offsets, jagged._lengths


def _bytes(*parts: torch.Tensor | None) -> int:
    return sum(p.numel() * p.element_size() for p in parts if p is not None)


def stored_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape :class:`TensorInfo` gives: ``(n,)`` for a nested tensor of ``n`` tensors."""
    if tensor.is_nested:
        return (int(tensor.size(0)),)
    return tuple(int(d) for d in tensor.shape)


def stored_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the data a file holds for ``tensor`` (indices and values when sparse)."""
    standing = _stands_for(tensor)
    if standing is not None:
        return standing.nbytes
    if tensor.is_nested:
        if tensor.layout == torch.jagged:
            return _bytes(*jagged_parts(tensor))
        return int(tensor.untyped_storage().nbytes())
    if tensor.layout != torch.strided:
        return _bytes(*sparse_parts(tensor))
    return tensor.numel() * tensor.element_size()


def tensor_info(name: str, tensor: torch.Tensor) -> TensorInfo:
    """The :class:`TensorInfo` of a tensor read from a file."""
    standing = _stands_for(tensor)
    dtype = tensor.dtype if standing is None else standing.dtype
    return TensorInfo(
        name, stored_shape(tensor), dtype_name(dtype), stored_nbytes(tensor), layout_name(tensor)
    )


def describe(tensor: torch.Tensor) -> str:
    """What ``tensor`` is, for messages: ``"a sparse_coo (sparse) float32 tensor"``,
    ``"a quantized tensor (qint8, per_tensor_affine)"``."""
    dtype = dtype_name(tensor.dtype)
    if tensor.device.type == "meta":
        return "on the meta device (it has no data)"
    if tensor.layout == torch.jagged:
        return f"a nested {dtype} tensor with the jagged layout"
    if is_nested(tensor):
        return f"a nested {dtype} tensor"
    if tensor.layout != torch.strided:
        return f"a {layout_name(tensor)} (sparse) {dtype} tensor"
    if tensor.is_quantized:
        scheme = str(tensor.qscheme()).removeprefix("torch.")
        return f"a quantized tensor ({dtype}, {scheme})"
    if tensor.dtype == FLOAT4 and tensor.dim() == 0:
        return f"a 0-d {dtype} tensor (two float4 values in one element, with no dimension)"
    return f"a {dtype} tensor"


# The dtypes torch.save writes: those with a typed storage class, and those it writes on
# untyped storage (float8, uint16, ...). It has no storage for a few shell dtypes (int4, ...).
_TORCH_DTYPES = _LEGACY_DTYPES | frozenset(torch.storage._new_dtypes())  # type: ignore[no-untyped-call]


def places(tensor: torch.Tensor) -> tuple[str, ...]:
    """Where ``tensor`` can be written and read back exactly (``SAFETENSORS``, ``TORCH_ZIP``,
    ``TORCH_LEGACY``, ``CHECKPOINT``), best first."""
    if tensor.device.type == "meta":
        return ()
    if tensor.layout == torch.jagged:
        # torch.load(weights_only=True), like torchkeep's reader, refuses jagged tensors in
        # torch files; checkpoints store their values and offsets.
        return (CHECKPOINT,)
    if is_nested(tensor):
        # torch.save writes nested tensors to legacy files that torch.load cannot read back.
        return (TORCH_ZIP, CHECKPOINT)
    if tensor.layout != torch.strided or tensor.is_quantized:
        return (TORCH_ZIP, TORCH_LEGACY, CHECKPOINT)
    dtype = tensor.dtype
    found = []
    if dtype in NAME_FROM_DTYPE and not (dtype == FLOAT4 and tensor.dim() == 0):
        found.append(SAFETENSORS)
    if dtype in _TORCH_DTYPES:
        found.append(TORCH_ZIP)
        if dtype in _LEGACY_DTYPES:
            found.append(TORCH_LEGACY)
    found.append(CHECKPOINT)
    return tuple(found)


def _hint(tensor: torch.Tensor) -> str:
    if tensor.device.type == "meta":
        return (
            "Materialise it first (for example model.to_empty(device='cpu'), then load or "
            "initialise its weights)."
        )
    if tensor.layout == torch.jagged:
        return (
            "For a .pt file, convert it to the strided nested layout first: "
            "torch.nested.nested_tensor(list(t.unbind()))."
        )
    if is_nested(tensor):
        return "Or save its tensors separately: dict(enumerate(t.unbind()))."
    if tensor.layout != torch.strided:
        return "Or convert it with .to_dense() first (the file may grow a lot)."
    if tensor.is_quantized:
        return (
            "Or store .int_repr() with its scale and zero point as plain tensors, or "
            ".dequantize() it."
        )
    if tensor.dtype not in _TORCH_DTYPES:
        return "Or store its bytes: t.view(torch.uint8)."
    if tensor.dtype == FLOAT4:
        return "Or give it a dimension: t.reshape(1)."
    return "Or convert it with .to(...) first."


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def unsupported(name: str, tensor: torch.Tensor, format: str | None = None) -> str:
    """Why ``format`` (``None``: safetensors, the strictest) cannot hold ``tensor``, where it
    can be saved instead and how to convert it; ``""`` when it can."""
    place = _FORMAT_PLACE.get(format or SAFETENSORS, SAFETENSORS)
    where = places(tensor)
    if place in where:
        return ""
    if not where:
        return f"tensor {name!r} is on the meta device and has no data. {_hint(tensor)}"
    holders = _listed([_PLACES[p] for p in where])
    if format is None:
        # The caller did not say which format it writes: name the holders only.
        return (
            f"tensor {name!r} is {describe(tensor)}; safetensors cannot store it, only "
            f"{holders} can hold it. {_hint(tensor)}"
        )
    return (
        f"tensor {name!r} is {describe(tensor)}, which {_SHORT[place]} cannot store; only "
        f"{holders} can hold it. {_hint(tensor)}"
    )


def check_saveable(name: str, tensor: torch.Tensor, format: str | None = None) -> None:
    """Refuse a tensor ``format`` cannot hold (``None``: safetensors), saying where it fits.

    Args:
        name: the tensor's name, for the message.
        tensor: the tensor.
        format: ``"safetensors"``, ``"sharded"``, ``"torch"``/``"torch-zip"``,
            ``"torch-legacy"`` or ``"checkpoint"``.

    Raises:
        UnsupportedTensorError: the format cannot hold it; the message names those that can.
        InvalidStateError: a meta tensor, which has no data for any format to hold.
    """
    problem = unsupported(name, tensor, format)
    if problem and tensor.device.type == "meta":
        raise InvalidStateError(problem)
    if problem:
        raise UnsupportedTensorError(problem)


def copy_into(dest: torch.Tensor, src: torch.Tensor, name: str = "") -> None:
    """``dest.copy_(src)`` for tensors read from a file, refusing what cannot be copied.

    A sparse, nested or quantized tensor is copied only into one of the same kind (a
    quantized one takes the file's scale and zero point with its values).

    Raises:
        UnsupportedTensorError: the kinds differ, or torch cannot convert between them.
    """

    def kind(tensor: torch.Tensor) -> tuple[str, object]:
        return layout_name(tensor), tensor.qscheme() if tensor.is_quantized else None

    fix = (
        "Read it with torchkeep.load_state_dict(path) and convert it to what the model holds "
        "(.to_dense(), .dequantize(), ...) before loading it."
    )
    if kind(dest) != kind(src):
        raise UnsupportedTensorError(
            f"tensor {name!r} in the file is {describe(src)}, but the model's is "
            f"{describe(dest)}: one cannot be copied into the other. {fix}"
        )
    try:
        dest.copy_(src)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        if is_plain(src) and is_plain(dest):
            # Dtypes torch has no conversion between (packed float4, bits, ...).
            fix = f"Give the model's tensor the file's dtype, {dtype_name(src.dtype)}."
        raise UnsupportedTensorError(
            f"cannot copy tensor {name!r} ({describe(src)}) into the model's tensor "
            f"({describe(dest)}): {exc}. {fix}"
        ) from exc


# -- rebuilding kinds from their parts (the parts come from files: every fact is checked) -----

SPARSE_LAYOUTS = (
    torch.sparse_coo,
    torch.sparse_csr,
    torch.sparse_csc,
    torch.sparse_bsr,
    torch.sparse_bsc,
)
QUANTIZED_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
    if hasattr(torch, name)
)
_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (
    torch.per_channel_affine,
    torch.per_channel_symmetric,
    torch.per_channel_affine_float_qparams,
)


def dense_part(value: object, what: str, *, index: bool = False) -> torch.Tensor:
    """``value`` if it is a plain dense tensor (of integer indices when ``index``).

    Raises:
        CorruptFileError: it is not.
    """
    if not isinstance(value, torch.Tensor) or type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise CorruptFileError(f"{what} is a {type(value).__name__}, not a tensor")
    if not is_plain(value):
        raise CorruptFileError(f"{what} is {describe(value)}, not a dense tensor")
    if index and value.dtype not in (torch.int32, torch.int64):
        raise CorruptFileError(f"{what} holds {dtype_name(value.dtype)}, not integer indices")
    return value


def _sizes(value: object, what: str) -> torch.Size:
    if not isinstance(value, (list, tuple)) or len(value) > 64:
        raise CorruptFileError(f"{what} is not a short list of sizes")
    if not all(type(v) is int and 0 <= v < 1 << 62 for v in value):
        raise CorruptFileError(f"{what} holds {list(value)!r}, not sizes")
    return torch.Size(value)


def _torch_checked(
    build: Callable[[], torch.Tensor],
    what: str,
    error: type[TorchkeepError] = CorruptFileError,
) -> torch.Tensor:
    try:
        return build()
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, IndexError) as exc:
        raise error(f"{what}: {exc}") from exc


def sparse_from_parts(
    layout: object, parts: Sequence[object], size: object, coalesced: object = None
) -> torch.Tensor:
    """A sparse tensor from its stored tensors (:func:`sparse_parts`), its invariants checked.

    Out-of-range or unsorted indices would make later kernels read outside the values, so
    torch's own checks run whenever there is data (``torch.load`` runs them only with
    ``torch.sparse.check_sparse_tensor_invariants`` enabled). Parts on the meta device have
    nothing to check, and nothing of them is ever read.

    Raises:
        CorruptFileError: the parts do not make a valid sparse tensor.
    """
    if layout not in SPARSE_LAYOUTS:
        raise CorruptFileError(f"{layout!r} is not a sparse layout")
    assert isinstance(layout, torch.layout)
    name = str(layout).removeprefix("torch.")
    shape = _sizes(size, f"a {name} tensor's size")
    count = 2 if layout == torch.sparse_coo else 3
    if len(parts) != count:
        raise CorruptFileError(f"a {name} tensor has {len(parts)} parts, not {count}")
    tensors = [
        dense_part(part, f"a {name} tensor's {what}", index=what != "values")
        for part, what in zip(parts, ["indices", "indices", "values"][-count:], strict=True)
    ]
    check = all(t.device.type != "meta" for t in tensors)
    if layout == torch.sparse_coo:
        if coalesced is not None and type(coalesced) is not bool:
            raise CorruptFileError(f"a {name} tensor's coalesced flag is {coalesced!r}")
        return _torch_checked(
            lambda: torch.sparse_coo_tensor(
                tensors[0], tensors[1], shape, check_invariants=check, is_coalesced=coalesced
            ),
            f"a {name} tensor is damaged",
        )
    return _torch_checked(
        lambda: torch.sparse_compressed_tensor(
            tensors[0], tensors[1], tensors[2], shape, layout=layout, check_invariants=check
        ),
        f"a {name} tensor is damaged",
    )


def nested_from_buffer(
    buffer: object, sizes: object, strides: object, offsets: object
) -> torch.Tensor:
    """A nested tensor (strided layout) as views of one buffer, each checked to lie inside it.

    On the meta device the sizes are unknown: the result is a :func:`stand_in`.

    Raises:
        CorruptFileError: the parts disagree, or a view reaches outside the buffer.
    """
    data = dense_part(buffer, "a nested tensor's buffer")
    size_t = dense_part(sizes, "a nested tensor's sizes", index=True)
    stride_t = dense_part(strides, "a nested tensor's strides", index=True)
    offset_t = dense_part(offsets, "a nested tensor's offsets", index=True)
    if (
        data.dim() != 1
        or data.storage_offset() != 0
        or not data.is_contiguous()
        or size_t.dim() != 2
        or size_t.shape[1] > 64
        or stride_t.shape != size_t.shape
        or offset_t.shape != size_t.shape[:1]
        or not size_t.dtype == stride_t.dtype == offset_t.dtype == torch.int64
    ):
        raise CorruptFileError("a nested tensor's buffer, sizes, strides and offsets disagree")
    count = int(size_t.shape[0])
    if any(t.device.type == "meta" for t in (data, size_t, stride_t, offset_t)):
        return stand_in((count,), data.dtype, data.numel() * data.element_size(), "nested")
    available = data.numel()
    for size, stride, offset in zip(
        size_t.tolist(), stride_t.tolist(), offset_t.tolist(), strict=True
    ):
        if min([offset, *size, *stride]) < 0:
            raise CorruptFileError("a nested tensor has a negative size, stride or offset")
        reach = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
        if numel(tuple(size)) and reach >= available:
            raise CorruptFileError(
                f"a nested tensor's part reaches element {reach} of a buffer of {available}"
            )
    return _torch_checked(
        lambda: torch._nested_view_from_buffer(data, size_t, stride_t, offset_t),  # type: ignore[attr-defined]
        "a nested tensor is damaged",
    )


def jagged_from_parts(
    values: object, offsets: object, lengths: object, ragged_idx: object
) -> torch.Tensor:
    """A jagged nested tensor from its values and offsets (and lengths), every part checked
    to lie inside the values.

    Raises:
        CorruptFileError: the parts disagree.
    """
    data = dense_part(values, "a jagged tensor's values")
    starts = dense_part(offsets, "a jagged tensor's offsets", index=True)
    counts = (
        None if lengths is None else dense_part(lengths, "a jagged tensor's lengths", index=True)
    )
    if type(ragged_idx) is not int or not 1 <= ragged_idx <= data.dim():
        raise CorruptFileError(f"a jagged tensor's ragged dimension is {ragged_idx!r}")
    if (
        starts.dim() != 1
        or not len(starts)
        or (counts is not None and counts.shape != (len(starts) - 1,))
    ):
        raise CorruptFileError("a jagged tensor's offsets and lengths disagree")
    extent = data.shape[ragged_idx - 1]
    bounds = starts.tolist()
    begins = bounds[:-1]
    if counts is None:
        ends = bounds[1:]
    else:
        ends = [begin + n for begin, n in zip(begins, counts.tolist(), strict=True)]
    if not all(0 <= b <= extent for b in bounds) or not all(
        begin <= end <= extent for begin, end in zip(begins, ends, strict=True)
    ):
        raise CorruptFileError(
            f"a jagged tensor's offsets and lengths reach outside its {extent} packed rows"
        )
    return _torch_checked(
        lambda: torch.nested.nested_tensor_from_jagged(data, starts, counts, jagged_dim=ragged_idx),
        "a jagged tensor is damaged",
    )


def quantized_template(
    dtype: object,
    shape: object,
    qscheme: object,
    scale: object = None,
    zero_point: object = None,
    axis: object = None,
) -> torch.Tensor:
    """An uninitialised quantized tensor with these facts, its storage sized by torch.

    Per-tensor schemes take ``scale`` (float) and ``zero_point`` (int); per-channel ones
    ``scale`` and ``zero_point`` as 1-d tensors of the axis' length, and ``axis``.

    Raises:
        CorruptFileError: facts that make no quantized tensor.
    """
    if dtype not in QUANTIZED_DTYPES:
        raise CorruptFileError(f"{dtype!r} is not a quantized dtype")
    assert isinstance(dtype, torch.dtype)
    size = _sizes(shape, "a quantized tensor's shape")
    if qscheme in _PER_TENSOR:
        if type(scale) not in (float, int) or type(zero_point) is not int:
            raise CorruptFileError("a quantized tensor's scale or zero point is not a number")
        assert isinstance(scale, (float, int))
        return _torch_checked(
            lambda: torch._empty_affine_quantized(  # type: ignore[attr-defined]
                size,
                scale=float(scale),
                zero_point=zero_point,
                dtype=dtype,  # type: ignore[arg-type]
            ),
            "a quantized tensor is damaged",
        )
    if qscheme not in _PER_CHANNEL:
        raise CorruptFileError(f"{qscheme!r} is not a quantization scheme")
    scales = dense_part(scale, "a quantized tensor's scales")
    zeros = dense_part(zero_point, "a quantized tensor's zero points")
    if type(axis) is not int or not 0 <= axis < len(size):
        raise CorruptFileError(f"a quantized tensor's axis is {axis!r}")
    if scales.shape != (size[axis],) or zeros.shape != (size[axis],):
        raise CorruptFileError("a quantized tensor's scales do not match its channels")
    return _torch_checked(
        lambda: torch._empty_per_channel_affine_quantized(  # type: ignore[attr-defined]
            size, scales=scales, zero_points=zeros, axis=axis, dtype=dtype
        ),
        "a quantized tensor is damaged",
    )


def quantized_state(tensor: torch.Tensor) -> dict[str, object]:
    """The facts :func:`quantized_template` takes, from a quantized tensor."""
    facts: dict[str, object] = {
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "qscheme": tensor.qscheme(),
    }
    if tensor.qscheme() in _PER_TENSOR:
        facts.update(scale=float(tensor.q_scale()), zero_point=int(tensor.q_zero_point()))
    else:
        facts.update(
            scale=tensor.q_per_channel_scales(),
            zero_point=tensor.q_per_channel_zero_points(),
            axis=int(tensor.q_per_channel_axis()),
        )
    return facts


def storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A ``uint8`` tensor over all of ``tensor``'s storage (shared, not copied)."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())  # type: ignore[call-overload]


def quantized_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A quantized tensor's stored bytes, laid out as :func:`quantized_template` allocates.

    Raises:
        UnsupportedTensorError: a view torch cannot copy into that layout (packed dtypes
            cannot be copied).
    """
    template = quantized_template(**quantized_state(tensor))
    own = template.untyped_storage().nbytes()
    if (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == own
    ):
        return storage_bytes(tensor)
    _torch_checked(
        lambda: template.copy_(tensor), f"cannot copy {describe(tensor)}", UnsupportedTensorError
    )
    return storage_bytes(template)


def quantized_from_bytes(data: object, facts: Mapping[str, object]) -> torch.Tensor:
    """The quantized tensor :func:`quantized_bytes` and :func:`quantized_state` describe.

    Raises:
        CorruptFileError: the facts make no quantized tensor, or the bytes do not fit it.
    """
    raw = dense_part(data, "a quantized tensor's bytes")
    tensor = quantized_template(**facts)  # type: ignore[arg-type]
    storage = tensor.untyped_storage()
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != storage.nbytes():
        raise CorruptFileError(
            f"a quantized tensor needs {storage.nbytes()} bytes, the file holds {raw.numel()}"
        )
    storage.copy_(raw.contiguous().untyped_storage())
    return tensor


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor's values as contiguous ``uint8`` (its dtype and shape kept apart)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def raw_from_bytes(data: object, dtype: object, shape: object) -> torch.Tensor:
    """The plain tensor :func:`raw_bytes` gave ``data`` for.

    Raises:
        CorruptFileError: the bytes do not fit the dtype and shape.
    """
    raw = dense_part(data, "a tensor's bytes")
    if not isinstance(dtype, torch.dtype) or dtype in QUANTIZED_DTYPES:
        raise CorruptFileError(f"{dtype!r} is not a plain dtype")
    size = _sizes(shape, "a tensor's shape")
    if (
        raw.dtype != torch.uint8
        or raw.dim() != 1
        or raw.numel() != numel(tuple(size)) * dtype.itemsize
    ):
        raise CorruptFileError(
            f"{raw.numel()} bytes do not hold a {dtype_name(dtype)}{list(size)} tensor"
        )
    return raw.contiguous().view(dtype).reshape(size)


# -- bytes, checksums, aliases ----------------------------------------------------------------


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous, plain CPU tensor, as a writable view sharing its memory."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray())
    return flat.view(torch.uint8).numpy().data


def xxh3(tensor: torch.Tensor) -> str:
    """The xxh3-64 checksum of a contiguous CPU tensor's bytes, as 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(byte_view(tensor))


def _alias_key(tensor: torch.Tensor) -> tuple[object, ...]:
    if not is_plain(tensor):
        # Sparse and nested tensors have no single storage; they are aliases when they are
        # the same object (a tied quantized weight is one object too).
        return ("object", id(tensor))
    storage = tensor.untyped_storage()
    return (
        tensor.device,
        storage.data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def find_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each name that is an exact alias of an earlier tensor to that earlier name.

    Tied weights (``decoder.weight is embedding.weight``) appear twice in a state dict; they are
    stored once and the second name is recorded as an alias. Tensors that merely overlap in
    memory are not aliases: each is stored separately.
    """
    first: dict[tuple[object, ...], str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in tensors.items():
        if is_plain(tensor) and tensor.numel() == 0:
            continue
        key = _alias_key(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def to_cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU tensor with the same values: contiguous and of type ``torch.Tensor`` when
    plain or quantized; sparse and nested tensors keep their structure (no copy when already
    so)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.layout != torch.strided or is_nested(tensor):
        return tensor
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if type(tensor) is not torch.Tensor:
        tensor = tensor.as_subclass(torch.Tensor)
    return tensor
