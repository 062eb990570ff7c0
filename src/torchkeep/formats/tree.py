"""Nested training state <-> flat named tensors plus a JSON structure, without pickle.

:class:`Flattener` walks a value and returns a JSON-able *node*: plain JSON for ``None``,
booleans, finite numbers, strings, lists and string-keyed dicts, and tagged objects
(``{"__tk__": "tuple", ...}``) for everything JSON cannot say exactly: tuples, dicts with
other keys, bytes, dtypes, devices, namespaces, dataclasses, paths, sets, complex numbers,
non-finite floats, numpy scalars. Tensors and numpy arrays become ``{"__tk__": "tensor",
"name": ...}`` references to a flat ``{name: tensor}`` mapping, named after their path in the
state (``optimizer.state.0.exp_avg``); tensors that are exact aliases are stored once.

Tensors safetensors cannot hold as they are are stored as the plain tensors they are made of,
under a node that says how to put them back together: sparse tensors as their indices and
values (``"sparse"``), quantized ones as their stored bytes and quantizer (``"quantized"``),
nested ones as their buffer with its sizes, strides and offsets (``"nested"``) or their values
and offsets (``"jagged"``), and dtypes safetensors has no name for (complex128, complex32,
bits, 0-d float4) as their bytes (``"raw"``). Reading them back checks every part (indices in
range, views inside their buffer) before torch is given them.

:class:`Unflattener` turns a node back into the value, validating every node it reads so a
damaged structure is reported with its path instead of surfacing as a ``KeyError`` later.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from torchkeep import _tensor_parts, _tensors
from torchkeep._tensors import (
    FLOAT4,
    NAME_FROM_DTYPE,
    alias_key,
    check_saveable,
    is_nested,
    is_plain,
)
from torchkeep.errors import (
    CorruptFileError,
    TorchkeepError,
    UnsupportedTensorError,
    UnsupportedValueError,
)
from torchkeep.formats.manifest import NON_FINITE

TAG = "__tk__"
_MAX_DEPTH = 200


def join(path: str, key: object) -> str:
    """``model`` + ``weight`` -> ``model.weight`` (a dict key, as torch names state)."""
    return f"{path}.{key}" if path else str(key)


def index(path: str, position: int) -> str:
    """``items`` + 2 -> ``items[2]`` (a position in a list or tuple)."""
    return f"{path}[{position}]"


def _describe(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _unsupported(value: object, path: str, why: str = "") -> UnsupportedValueError:
    reason = f" ({why})" if why else ""
    return UnsupportedValueError(
        f"cannot save the {_describe(value)} at {path or 'the top level'!r}{reason}: checkpoints "
        "hold tensors, numpy arrays, numbers, strings, bytes, None, lists, tuples, dicts, sets, "
        "argparse.Namespace, dataclasses, paths, dtypes, devices and objects with "
        "state_dict()/load_state_dict(). Convert it to one of those, or pass "
        "allow_pickle=True to store it in a pickle side file (objects.pkl) that loads only with "
        "trust=True.",
        path=path,
    )


def tensor_problem(tensor: torch.Tensor) -> str:
    """Why a tensor cannot go into a checkpoint, or ``""`` when it can."""
    if tensor.device.type == "meta":
        return "a meta tensor, which has no data"
    return ""


def _as_is(tensor: torch.Tensor) -> bool:
    """Whether a safetensors shard holds ``tensor`` as it is (else it is stored in parts)."""
    return (
        is_plain(tensor)
        and tensor.dtype in NAME_FROM_DTYPE
        and not (tensor.dtype == FLOAT4 and tensor.dim() == 0)
    )


_QSCHEMES = {
    str(q).removeprefix("torch."): q for q in vars(torch).values() if isinstance(q, torch.qscheme)
}
_LAYOUTS = {str(layout).removeprefix("torch."): layout for layout in _tensor_parts.SPARSE_LAYOUTS}
# The parts of a sparse tensor in a checkpoint node, by whether it is COO.
_SPARSE_KEYS = {
    True: ("indices", "values"),
    False: ("compressed_indices", "plain_indices", "values"),
}


class Flattener:
    """Encodes values into JSON nodes, collecting their tensors.

    Args:
        allow_pickle: keep unsupported objects in ``objects`` (to be pickled by the caller)
            instead of raising :class:`UnsupportedValueError`.
    """

    def __init__(self, *, allow_pickle: bool = False) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.objects: list[object] = []
        self.pickled_paths: list[str] = []
        self._allow_pickle = allow_pickle
        self._alias: dict[tuple[object, ...], str] = {}
        self._active: set[int] = set()
        # Tensors stored in parts, by id (the tensor is kept so its id stays unique).
        self._composites: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

    def encode(self, value: object, path: str, depth: int = 0) -> Any:
        """The JSON node for ``value``, found at ``path`` in the state."""
        if depth > _MAX_DEPTH:
            raise _unsupported(value, path, f"nested more than {_MAX_DEPTH} levels deep")
        if value is None:
            return None
        # Subclasses (enums, numpy's float64) are stored as their plain value.
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, str):
            return str(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {TAG: "float", "value": str(value)}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, "tensor")
        if isinstance(value, np.ndarray):
            return self._ndarray(value, path)
        if isinstance(value, np.generic):
            return self._scalar(value, path, depth)
        if isinstance(value, (list, tuple, set, frozenset, dict, argparse.Namespace)) or (
            dataclasses.is_dataclass(value) and not isinstance(value, type)
        ):
            if id(value) in self._active:
                raise _unsupported(value, path, "it contains itself")
            self._active.add(id(value))
            try:
                return self._container(value, path, depth)
            finally:
                self._active.discard(id(value))
        if isinstance(value, complex):
            return {
                TAG: "complex",
                "real": self.encode(value.real, path),
                "imag": self.encode(value.imag, path),
            }
        if isinstance(value, bytes | bytearray):
            return {TAG: "bytes", "base64": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {TAG: "dtype", "value": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {TAG: "device", "value": str(value)}
        if isinstance(value, pathlib.PurePath):
            return {TAG: "path", "value": str(value)}
        return self._pickle(value, path, "")

    def _container(self, value: Any, path: str, depth: int) -> Any:
        if isinstance(value, list):
            return [self.encode(v, index(path, i), depth + 1) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            items = [self.encode(v, index(path, i), depth + 1) for i, v in enumerate(value)]
            return {TAG: "tuple", "items": items}
        if isinstance(value, set | frozenset):
            items = [self.encode(v, index(path, i), depth + 1) for i, v in enumerate(value)]
            return {TAG: "frozenset" if isinstance(value, frozenset) else "set", "items": items}
        if isinstance(value, argparse.Namespace):
            return {TAG: "namespace", "fields": self._dict(vars(value), path, depth)}
        if isinstance(value, dict):
            return self._dict(value, path, depth)
        assert dataclasses.is_dataclass(value) and not isinstance(value, type)
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        kind = type(value)
        return {
            TAG: "dataclass",
            "type": f"{kind.__module__}:{kind.__qualname__}",
            "fields": self._dict(fields, path, depth),
        }

    def _dict(self, value: Mapping[Any, Any], path: str, depth: int) -> Any:
        if all(type(k) is str for k in value) and TAG not in value:
            return {k: self.encode(v, join(path, k), depth + 1) for k, v in value.items()}
        # Optimizer state is keyed by parameter index: JSON objects cannot say that.
        items = []
        for key, item in value.items():
            if isinstance(key, torch.Tensor | np.ndarray):
                raise _unsupported(key, join(path, repr(key)), "a tensor used as a dict key")
            items.append(
                [self.encode(key, path, depth + 1), self.encode(item, join(path, key), depth + 1)]
            )
        return {TAG: "dict", "items": items}

    def _scalar(self, value: np.generic, path: str, depth: int) -> Any:
        if value.dtype.kind not in "biufc":
            return self._pickle(value, path, f"numpy {value.dtype} scalar")
        return {
            TAG: "numpy_scalar",
            "dtype": value.dtype.str,
            "value": self.encode(value.item(), path, depth + 1),
        }

    def _ndarray(self, array: np.ndarray, path: str) -> Any:
        if array.dtype.kind not in "biufc":
            return self._pickle(array, path, f"numpy dtype {array.dtype}")
        native = array.astype(array.dtype.newbyteorder("="), copy=False)
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(native))
        except TypeError as exc:
            return self._pickle(array, path, str(exc))
        node = self._tensor(tensor, path, "ndarray")
        if node.get(TAG) == "ndarray":
            node["dtype"] = array.dtype.str
        elif node.get(TAG) == "raw":  # complex128: its bytes, read back as an array
            node["ndarray"] = array.dtype.str
        return node

    def _tensor(self, tensor: torch.Tensor, path: str, tag: str) -> Any:
        problem = tensor_problem(tensor)
        if problem:
            return self._pickle(tensor, path, problem)
        if not _as_is(tensor):
            return self._composite(tensor, path)
        requires_grad = tensor.requires_grad
        tensor = tensor.detach()
        key = alias_key(tensor) if tensor.numel() else None
        name = self._alias.get(key) if key is not None else None
        if name is None:
            base = name = path or "tensor"
            counter = 1
            while name in self.tensors:  # a dict key "a.b" and a nested a -> b, say
                counter += 1
                name = f"{base}~{counter}"
            # The flattener holds every tensor, so a recorded data_ptr cannot be reused.
            self.tensors[name] = tensor
            if key is not None:
                self._alias[key] = name
        node: dict[str, Any] = {TAG: tag, "name": name}
        if requires_grad:
            node["requires_grad"] = True
        return node

    def _composite(self, tensor: torch.Tensor, path: str) -> Any:
        """A tensor stored as the plain tensors it is made of (see the module's docstring)."""
        if id(tensor) in self._composites:
            return self._composites[id(tensor)][1]
        original, tensor = tensor, tensor.detach()

        def part(value: torch.Tensor, key: str) -> Any:
            return self._tensor(value, join(path, key), "tensor")

        node: dict[str, Any]
        if tensor.layout == torch.jagged:
            values, offsets, lengths = _tensors.jagged_parts(tensor)
            node = {
                TAG: "jagged",
                "values": part(values, "values"),
                "offsets": part(offsets, "offsets"),
                "lengths": None if lengths is None else part(lengths, "lengths"),
                "ragged_idx": int(tensor._ragged_idx),  # type: ignore[attr-defined]
            }
        elif is_nested(tensor):
            node = {
                TAG: "nested",
                "buffer": part(tensor.values(), "buffer"),
                "sizes": part(tensor._nested_tensor_size(), "sizes"),  # type: ignore[attr-defined]
                "strides": part(tensor._nested_tensor_strides(), "strides"),  # type: ignore[attr-defined]
                "offsets": part(tensor._nested_tensor_storage_offsets(), "offsets"),  # type: ignore[attr-defined]
            }
        elif tensor.layout != torch.strided:
            keys = _SPARSE_KEYS[tensor.layout == torch.sparse_coo]
            node = {
                TAG: "sparse",
                "layout": str(tensor.layout).removeprefix("torch."),
                "size": list(tensor.shape),
                **{k: part(p, k) for k, p in zip(keys, _tensors.sparse_parts(tensor), strict=True)},
            }
            if tensor.layout == torch.sparse_coo:
                node["coalesced"] = bool(tensor.is_coalesced())
        elif tensor.is_quantized:
            try:
                data = _tensor_parts.quantized_bytes(tensor)
            except UnsupportedTensorError as exc:
                return self._pickle(original, path, str(exc))
            facts = _tensor_parts.quantized_state(tensor)
            node = {
                TAG: "quantized",
                "dtype": _tensors.dtype_name(tensor.dtype),
                "shape": facts["shape"],
                "qscheme": str(facts["qscheme"]).removeprefix("torch."),
                "data": part(data, "data"),
            }
            if "axis" in facts:
                node["scales"] = part(facts["scale"], "scales")  # type: ignore[arg-type]
                node["zero_points"] = part(facts["zero_point"], "zero_points")  # type: ignore[arg-type]
                node["axis"] = facts["axis"]
            else:
                node["scale"] = self.encode(facts["scale"], path)
                node["zero_point"] = facts["zero_point"]
        else:
            node = {
                TAG: "raw",
                "dtype": _tensors.dtype_name(tensor.dtype),
                "shape": list(tensor.shape),
                "data": part(_tensor_parts.raw_bytes(tensor), "bytes"),
            }
        if original.requires_grad:
            node["requires_grad"] = True
        self._composites[id(original)] = (original, node)
        return node

    def _pickle(self, value: object, path: str, why: str) -> Any:
        if not self._allow_pickle:
            raise _unsupported(value, path, why)
        self.objects.append(value)
        self.pickled_paths.append(path)
        return {TAG: "pickle", "index": len(self.objects) - 1, "type": _describe(value)}


TensorReader = Callable[[str], torch.Tensor]


class Unflattener:
    """Decodes JSON nodes back into values.

    Args:
        read_tensor: returns the tensor stored under a flat name (called once per name).
        objects: returns the unpickled side objects; called only when a node needs them.
        where: the file being read, for error messages.
    """

    def __init__(
        self,
        read_tensor: TensorReader,
        objects: Callable[[], Sequence[object]] | None = None,
        where: str = "",
    ) -> None:
        self._read = read_tensor
        self._objects = objects
        self._cache: dict[str, torch.Tensor] = {}
        self._where = where

    def _corrupt(self, path: str, problem: str) -> CorruptFileError:
        return CorruptFileError(
            f"checkpoint {self._where!r} has a damaged structure at {path or 'the top level'!r}: "
            f"{problem}"
        )

    def decode(self, node: Any, path: str) -> Any:
        """The value ``node`` encodes (a dataclass comes back as a dict of its fields)."""
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, index(path, i)) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self._corrupt(path, f"unexpected JSON value {node!r}")
        tag = node.get(TAG)
        if tag is None:
            return {k: self.decode(v, join(path, k)) for k, v in node.items()}
        try:
            return self._tagged(str(tag), node, path)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, TorchkeepError):
                raise
            raise self._corrupt(path, f"invalid {tag!r} node ({exc!r})") from exc

    def _items(self, node: dict[str, Any], path: str) -> list[Any]:
        return [self.decode(v, index(path, i)) for i, v in enumerate(node["items"])]

    def _tagged(self, tag: str, node: dict[str, Any], path: str) -> Any:
        if tag in ("tensor", "ndarray"):
            tensor = self._tensor(str(node["name"]), path)
            if tag == "ndarray":
                return tensor.numpy().astype(np.dtype(node["dtype"]), copy=False)
            if node.get("requires_grad"):
                tensor = tensor.detach().requires_grad_(True)
            return tensor
        if tag in ("sparse", "quantized", "nested", "jagged", "raw"):
            return self._composite(tag, node, path)
        if tag == "tuple":
            return tuple(self._items(node, path))
        if tag == "set":
            return set(self._items(node, path))
        if tag == "frozenset":
            return frozenset(self._items(node, path))
        if tag == "dict":
            return {
                self.decode(k, path): self.decode(v, join(path, str(k))) for k, v in node["items"]
            }
        if tag == "float":
            return NON_FINITE[node["value"]]
        if tag == "complex":
            return complex(self.decode(node["real"], path), self.decode(node["imag"], path))
        if tag == "bytes":
            return base64.b64decode(node["base64"], validate=True)
        if tag == "dtype":
            dtype = getattr(torch, node["value"], None)
            if not isinstance(dtype, torch.dtype):
                raise self._corrupt(path, f"unknown dtype {node['value']!r}")
            return dtype
        if tag == "device":
            return torch.device(node["value"])
        if tag == "path":
            return pathlib.Path(node["value"])
        if tag == "numpy_scalar":
            return np.dtype(node["dtype"]).type(self.decode(node["value"], path))
        if tag == "namespace":
            return argparse.Namespace(**self._fields(node, path))
        if tag == "dataclass":
            # Building a class named in a file would run its code: its fields come back as a
            # dict, and the caller's own dataclass (passed as a target) rebuilds it.
            return self._fields(node, path)
        if tag == "pickle":
            if self._objects is None:
                raise self._corrupt(path, "a pickled object, but the checkpoint has no objects")
            return self._objects()[int(node["index"])]
        raise self._corrupt(path, f"unknown tag {tag!r} (written by a newer torchkeep?)")

    def _composite(self, tag: str, node: dict[str, Any], path: str) -> torch.Tensor:
        """A tensor stored in parts, each part checked before torch sees it."""

        def part(key: str) -> Any:
            return self.decode(node[key], join(path, key))

        def dtype(value: object) -> torch.dtype:
            found = getattr(torch, str(value), None)
            if not isinstance(found, torch.dtype):
                raise self._corrupt(path, f"unknown dtype {value!r}")
            return found

        build: Callable[[], torch.Tensor]
        if tag == "sparse":
            layout = _LAYOUTS.get(str(node["layout"]))
            keys = _SPARSE_KEYS[layout == torch.sparse_coo]
            parts = [part(k) for k in keys]
            build = partial(
                _tensor_parts.sparse_from_parts, layout, parts, node["size"], node.get("coalesced")
            )
        elif tag == "quantized":
            facts: dict[str, object] = {
                "dtype": dtype(node["dtype"]),
                "shape": node["shape"],
                "qscheme": _QSCHEMES.get(str(node["qscheme"])),
            }
            if "axis" in node:
                facts.update(
                    scale=part("scales"), zero_point=part("zero_points"), axis=node["axis"]
                )
            else:
                facts.update(scale=part("scale"), zero_point=node["zero_point"])
            build = partial(_tensor_parts.quantized_from_bytes, part("data"), facts)
        elif tag == "nested":
            keys = ("buffer", "sizes", "strides", "offsets")
            build = partial(_tensor_parts.nested_from_buffer, *[part(k) for k in keys])
        elif tag == "jagged":
            lengths = None if node.get("lengths") is None else part("lengths")
            build = partial(
                _tensor_parts.jagged_from_parts,
                part("values"),
                part("offsets"),
                lengths,
                node["ragged_idx"],
            )
        else:
            build = partial(
                _tensor_parts.raw_from_bytes, part("data"), dtype(node["dtype"]), node["shape"]
            )
        try:
            tensor = build()
        except CorruptFileError as exc:
            raise self._corrupt(path, str(exc)) from exc
        if tag == "raw" and "ndarray" in node:
            return tensor.numpy().astype(np.dtype(node["ndarray"]), copy=False)  # type: ignore[return-value]
        if node.get("requires_grad"):
            tensor = tensor.detach().requires_grad_(True)
        return tensor

    def _fields(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        fields = self.decode(node["fields"], path)
        if not isinstance(fields, dict):
            raise self._corrupt(path, "fields are not a dict")
        return fields

    def _tensor(self, name: str, path: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._read(name)
        return self._cache[name]


def map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``function`` applied to every tensor inside lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, list):
        return [map_tensors(v, function) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(map_tensors(v, function) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, function) for k, v in value.items()}
    return value


_TORCH_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def to_torch_plain(value: Any, path: str, *, allow_pickle: bool = False) -> Any:
    """``value`` as types ``torch.load(weights_only=True)`` accepts, for ``.pt`` checkpoints.

    Namespaces and dataclasses become dicts of their fields, numpy arrays become tensors,
    numpy scalars Python numbers, paths strings and frozensets sets.

    Raises:
        UnsupportedValueError: a value that needs pickle, unless ``allow_pickle``.
        UnsupportedTensorError: a tensor torch files cannot hold (a jagged nested tensor,
            which torchkeep's reader and ``torch.load(weights_only=True)`` refuse, or a dtype
            ``torch.save`` cannot write), unless ``allow_pickle``.
        InvalidStateError: a meta tensor (no data), unless ``allow_pickle``.
    """
    if isinstance(value, torch.Tensor) and not allow_pickle:
        check_saveable(path, value, "torch")
    if type(value) not in (bool, int, float, str):
        for plain in (bool, int, float, str):
            if isinstance(value, plain):
                # Subclasses (enums, torch's TorchVersion) would need their class to unpickle.
                return plain(value)
    if isinstance(value, (torch.Tensor, *_TORCH_LEAVES)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return torch.from_numpy(np.ascontiguousarray(value.astype(value.dtype.newbyteorder("="))))
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return value.item()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = [
            to_torch_plain(v, index(path, i), allow_pickle=allow_pickle)
            for i, v in enumerate(value)
        ]
        return (
            list(items)
            if isinstance(value, list)
            else (tuple(items) if isinstance(value, tuple) else set(items))
        )
    fields: Mapping[Any, Any] | None = None
    if isinstance(value, argparse.Namespace):
        fields = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(value, dict):
        fields = value
    if fields is not None:
        out = {
            k: to_torch_plain(v, join(path, k), allow_pickle=allow_pickle)
            for k, v in fields.items()
        }
        bad = [k for k in out if not isinstance(k, str | int | float | bool | tuple | type(None))]
        if bad and not allow_pickle:
            raise _unsupported(bad[0], join(path, repr(bad[0])), "used as a dict key")
        if hasattr(value, "_metadata"):  # a module state dict keeps torch's version info
            kept: Any = type(value)(out) if isinstance(value, dict) else out
            kept._metadata = value._metadata
            return kept
        return out
    if allow_pickle:
        return value
    raise _unsupported(value, path)


__all__ = [
    "TAG",
    "Flattener",
    "UnsupportedValueError",
    "Unflattener",
    "index",
    "join",
    "map_tensors",
    "to_torch_plain",
]
