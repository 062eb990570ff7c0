"""Tensor kinds rebuilt from their parts: sparse, nested, quantized and raw-byte tensors.

The parts come from files, so every fact is checked before torch sees it: index ranges and
dtypes, sizes against buffers, quantizer parameters; a violation is a
:class:`~torchkeep.errors.CorruptFileError`, never a crash. The writers' side (what parts a
tensor has) lives here too, so both directions read as one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from torchkeep._facts import numel
from torchkeep._tensors import describe, dtype_name, is_plain, stand_in
from torchkeep.errors import (
    CorruptFileError,
    TorchkeepError,
    UnsupportedTensorError,
)

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


# quint4x2 and quint2x4 pack two and four values into each byte.
_PACKED_BITS = {
    getattr(torch, name): bits
    for name, bits in (("quint4x2", 4), ("quint2x4", 2))
    if hasattr(torch, name)
}


def _zero_range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype in _PACKED_BITS:
        return 0, (1 << _PACKED_BITS[dtype]) - 1
    if dtype == torch.qint8:
        return -128, 127
    if dtype == torch.qint32:
        return -(1 << 31), (1 << 31) - 1
    return 0, 255


def check_channel_qparams(
    dtype: torch.dtype, qscheme: object, scales: torch.Tensor, zeros: torch.Tensor
) -> None:
    """Per-channel scales finite and positive; zero points finite (float ones) or inside the
    dtype's range (integer ones). torch builds a tensor from others and fails only when the
    tensor is used.

    Raises:
        CorruptFileError: parameters no quantized tensor can have.
    """
    if not scales.is_floating_point() or not bool(((scales > 0) & scales.isfinite()).all()):
        raise CorruptFileError("quantization scales are not finite positive numbers")
    if qscheme == torch.per_channel_affine_float_qparams or zeros.is_floating_point():
        if not zeros.is_floating_point() or not bool(zeros.isfinite().all()):
            raise CorruptFileError("quantization zero points are not finite numbers")
        return
    low, high = _zero_range(dtype)
    if zeros.is_complex() or (
        zeros.numel() and not (low <= int(zeros.min()) and int(zeros.max()) <= high)
    ):
        raise CorruptFileError(
            f"quantization zero points lie outside {low}..{high}, the range of {dtype}"
        )


def check_tensor_qparams(dtype: torch.dtype, scale: float, zero_point: int) -> None:
    """:func:`check_channel_qparams` for a per-tensor scale and zero point."""
    if not (math.isfinite(scale) and scale > 0):
        raise CorruptFileError(f"a quantization scale is {scale!r}, not a finite positive number")
    low, high = _zero_range(dtype)
    if not low <= zero_point <= high:
        raise CorruptFileError(
            f"a quantization zero point is {zero_point}, outside {low}..{high}, the range of "
            f"{dtype}"
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
        check_tensor_qparams(dtype, scale, zero_point)
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
    check_channel_qparams(dtype, qscheme, scales, zeros)
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
