"""Tensor facts shared by the formats: dtype names, raw bytes, checksums, aliasing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import xxhash

from torchkeep.errors import InvalidStateError

# safetensors' dtype names; only those this torch build has are kept.
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
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}
DTYPE_FROM_NAME: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _SAFETENSORS_DTYPES.items() if hasattr(torch, name)
}
NAME_FROM_DTYPE: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPE_FROM_NAME.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What a file says about one tensor, read without its data.

    Attributes:
        name: the tensor's flat name.
        shape: its shape.
        dtype: its dtype, as torch spells it without the ``torch.`` prefix (``float32``).
        nbytes: the size of its data in bytes.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a writable view sharing its memory."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray())
    return flat.view(torch.uint8).numpy().data


def xxh3(tensor: torch.Tensor) -> str:
    """The xxh3-64 checksum of a contiguous CPU tensor's bytes, as 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(byte_view(tensor))


def check_saveable(name: str, tensor: torch.Tensor) -> None:
    """Refuse tensors that no weights format can hold, saying how to fix them."""
    if tensor.layout != torch.strided:
        raise InvalidStateError(
            f"tensor {name!r} is {tensor.layout} (sparse); weights files hold dense tensors. "
            "Convert it first with .to_dense()."
        )
    if tensor.is_quantized:
        raise InvalidStateError(
            f"tensor {name!r} is quantized; dequantize it with .dequantize() before saving."
        )
    if tensor.device.type == "meta":
        raise InvalidStateError(
            f"tensor {name!r} is on the meta device and has no data; "
            "materialise the model (for example with .to_empty() and loading weights) first."
        )
    if tensor.dtype not in NAME_FROM_DTYPE:
        raise InvalidStateError(
            f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store; "
            "save it as .pt, or convert it with .to(...) first."
        )


def _alias_key(tensor: torch.Tensor) -> tuple[object, ...]:
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
        if tensor.numel() == 0:
            continue
        key = _alias_key(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def to_cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU tensor with the same values (no copy when already one)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if type(tensor) is not torch.Tensor:
        tensor = tensor.as_subclass(torch.Tensor)
    return tensor
