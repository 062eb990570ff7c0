"""What a file states about its contents, in terms that need no torch.

dtype names and sizes, :class:`TensorInfo` (one tensor) and :class:`ModuleEntry` (one module
of a model's tree). A leaf: imports nothing but the standard library, so readers of headers
(safetensors, checkpoint manifests) and the command line can describe files without
importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# safetensors' dtype codes -> the dtype's name in torch. F4 counts 4-bit values: torch's
# float4_e2m1fn_x2 packs two of them into each element, so a file's last dimension is twice
# torch's (the convention of the safetensors library itself).
SAFETENSORS_DTYPES: dict[str, str] = {
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
FLOAT4_NAME = "float4_e2m1fn_x2"

# Bytes per element of each dtype above, by its torch name.
ITEM_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    FLOAT4_NAME: 1,
    "complex64": 8,
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


@dataclass(frozen=True)
class ModuleEntry:
    """One module of a model's tree, as found in a file.

    Attributes:
        name: its dotted path (``""`` for the root).
        type: its class's fully qualified name (recorded in the file; the class may not exist).
        params: elements in its parameters and persistent buffers, children included.
        depth: nesting level (0 for the root).
    """

    name: str
    type: str
    params: int
    depth: int


def numel(shape: tuple[int, ...]) -> int:
    """The number of elements of a tensor of this shape."""
    count = 1
    for dim in shape:
        count *= dim
    return count


__all__ = ["FLOAT4_NAME", "ITEM_SIZES", "SAFETENSORS_DTYPES", "ModuleEntry", "TensorInfo", "numel"]
