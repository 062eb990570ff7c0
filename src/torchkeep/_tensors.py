"""Tensor facts shared by the formats: dtype names, kinds, raw bytes, checksums, aliasing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from torchkeep._facts import SAFETENSORS_DTYPES, TensorInfo
from torchkeep.errors import (
    InvalidStateError,
    UnsupportedTensorError,
)

# Only the dtypes this torch build has are kept.
DTYPE_FROM_NAME: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in SAFETENSORS_DTYPES.items() if hasattr(torch, name)
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


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


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


def alias_key(tensor: torch.Tensor) -> tuple[object, ...]:
    """What makes two tensors one: device, storage, offset, shape, stride and dtype (for
    sparse, nested and quantized tensors, the object itself). The one alias test there is."""
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
        key = alias_key(tensor)
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
