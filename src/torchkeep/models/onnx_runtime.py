"""ONNX graphs as torch modules: told apart by their bytes, run through onnxruntime.

An ONNX file is a serialised ``ModelProto`` (protobuf), which has no magic number. It is
recognised by walking its top-level fields the way a protobuf parser would: every field a
known ``ModelProto`` field with its wire type, every length inside the file, the last field
ending exactly at the end of the file, ``ir_version`` and ``graph`` present. Only the field
headers are read, so the walk costs a few reads whatever the size of the weights.

Running a graph needs no trust: onnxruntime interprets a fixed set of operators, and a file
cannot make it load an operator library (only the caller can, through ``SessionOptions``, which
is never done here). What a file can do is name external-data files for its weights; without
``trust=True`` every such name must stay inside the model's folder, so a crafted file cannot
read ``../../home/me/.ssh/id_rsa`` into its weights (onnxruntime refuses this itself since
1.24; this check also covers older versions).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from torchkeep.errors import (
    CorruptFileError,
    DeviceError,
    InvalidArgumentError,
    InvalidStateError,
    MissingDependencyError,
    UnsafeFileError,
)

INSTALL = "pip install 'torchkeep[onnx]'"

# ModelProto's fields and their wire types (0 varint, 2 length-delimited), from onnx.proto.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_IR_VERSION, _GRAPH = 1, 7
_MAX_FIELDS = 1 << 16
_MAX_IR_VERSION = 1000


def _varint(f: io.BufferedReader) -> int | None:
    value = 0
    for shift in range(0, 64, 7):
        byte = f.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
    return None


def looks_like_onnx(path: Path) -> bool:
    """Whether ``path`` holds a serialised ONNX ``ModelProto`` (see the module's docstring)."""
    try:
        with open(path, "rb") as f:
            return _walk_model(f, os.fstat(f.fileno()).st_size)
    except OSError:
        return False


def _walk_model(f: io.BufferedReader, size: int) -> bool:
    seen: set[int] = set()
    for _ in range(_MAX_FIELDS):
        if f.tell() == size:
            return _IR_VERSION in seen and _GRAPH in seen
        tag = _varint(f)
        if tag is None:
            return False
        field, wire = tag >> 3, tag & 7
        expected = _MODEL_FIELDS.get(field)
        if field == 0 or (expected is not None and wire != expected):
            return False
        if wire == 0:
            value = _varint(f)
            if value is None or (field == _IR_VERSION and not 1 <= value <= _MAX_IR_VERSION):
                return False
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            if f.tell() > size:
                return False
        elif wire == 2:
            length = _varint(f)
            if length is None or f.tell() + length > size:
                return False
            f.seek(length, os.SEEK_CUR)
        else:  # groups (3, 4) are not in ModelProto; 6 and 7 are not wire types
            return False
        seen.add(field)
    return False


def require_onnxruntime(doing: str) -> Any:
    """The ``onnxruntime`` module, or an error that says how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            f"{doing} needs onnxruntime, which is not installed: {INSTALL}"
        ) from exc
    return onnxruntime


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers, constants and those of subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        if attribute.HasField("g"):
            yield from _tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _tensors(graph)


def check_external_data(path: Path) -> None:
    """Refuse a file whose weights name files outside its folder (or absolute paths).

    Raises:
        UnsafeFileError: a location escapes the folder.
        MissingDependencyError: the onnx package is not installed.
        CorruptFileError: the onnx package cannot parse the file.
    """
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError(
            f"checking where {str(path)!r} reads its weights from needs the onnx package: "
            f"{INSTALL} (or pass trust=True to skip the check)"
        ) from exc
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and others
        raise CorruptFileError(f"cannot read {str(path)!r} as an ONNX model: {exc}") from exc
    folder = path.parent.resolve()
    functions = (t for function in model.functions for n in function.node for t in _node_tensors(n))
    for tensor in (*_tensors(model.graph), *functions):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise UnsafeFileError(
                f"refusing {str(path)!r}: its tensor {tensor.name!r} takes its data from "
                f"{location!r}, outside the model's folder {str(folder)!r}, so running it "
                "would read an unrelated file into the weights. Nothing was loaded. Pass "
                "trust=True only if you made the file and meant that location.",
                path=str(path),
            )


def _signature(value: Any) -> str:
    """``x: float[batch, 4]`` for an onnxruntime NodeArg."""
    kind = str(value.type).removeprefix("tensor(").removesuffix(")")
    dims = ", ".join(str(d) if d is not None else "?" for d in value.shape)
    return f"{value.name}: {kind}[{dims}]"


class OnnxModule(torch.nn.Module):
    """An ONNX graph run by onnxruntime, called like the module it was exported from.

    Positional tensors (nested tuples, lists and dicts are flattened in order) fill the graph's
    inputs in order; keyword arguments fill them by name. Outputs come back as tensors on the
    module's device: one tensor, or a tuple when the graph has several outputs. The graph runs
    inference only, so the module is always in eval mode and nothing tracks gradients; its
    dtype is fixed by the export.
    """

    def __init__(self, path: Path, device: torch.device | None = None) -> None:
        """Open ``path`` with onnxruntime on ``device`` (the CPU by default).

        Raises:
            MissingDependencyError: onnxruntime is not installed.
            DeviceError: onnxruntime here cannot run on ``device``.
            CorruptFileError: onnxruntime cannot load the graph.
        """
        super().__init__()
        self.path = path
        self._device = torch.device("cpu")
        self._session: Any = None
        self._open(device or torch.device("cpu"))
        super().train(False)

    def _open(self, device: torch.device) -> None:
        ort = require_onnxruntime(f"running the ONNX graph {str(self.path)!r}")
        providers: list[Any]
        if device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device.type == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise DeviceError(
                    f"cannot run {str(self.path)!r} on {str(device)!r}: this onnxruntime has no "
                    f"CUDAExecutionProvider (it has {', '.join(available)}); install "
                    "onnxruntime-gpu in place of onnxruntime, or use device='cpu'"
                )
            options = {"device_id": device.index or 0}
            providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        else:
            raise DeviceError(
                f"cannot run {str(self.path)!r} on {str(device)!r}: torchkeep runs ONNX graphs "
                "with onnxruntime on 'cpu' or 'cuda' only"
            )
        try:
            session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as exc:  # onnxruntime's own Fail, InvalidGraph, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CorruptFileError(f"onnxruntime cannot load {str(self.path)!r}: {first}") from exc
        self._session, self._device = session, device
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def signature(self) -> str:
        """The graph's inputs, for messages: ``x: float[batch, 4]``."""
        return ", ".join(_signature(i) for i in self._session.get_inputs())

    def extra_repr(self) -> str:
        provider = self._session.get_providers()[0]
        return f"{self.path.name!r}, inputs=({self.signature()}), provider={provider}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        positional = [leaf for leaf in tree_flatten(args)[0] if isinstance(leaf, torch.Tensor)]
        unknown = sorted(set(kwargs) - set(self.input_names))
        free = [n for n in self.input_names if n not in kwargs]
        if unknown or len(positional) != len(free):
            raise InvalidArgumentError(
                f"{self.path.name} takes the tensors ({self.signature()}), got "
                f"{len(positional)} positional tensor(s)"
                + (f" and keywords {', '.join(map(repr, kwargs))}" if kwargs else "")
                + (f"; unknown names: {', '.join(unknown)}" if unknown else "")
            )
        feed = dict(zip(free, positional, strict=True))
        feed.update({n: v for n, v in kwargs.items() if isinstance(v, torch.Tensor)})
        arrays = {}
        for name, tensor in feed.items():
            try:
                arrays[name] = tensor.detach().cpu().contiguous().numpy()
            except TypeError as exc:  # bfloat16 and other dtypes numpy lacks
                raise InvalidArgumentError(
                    f"input {name!r} is a {tensor.dtype} tensor, which onnxruntime cannot take "
                    f"through numpy; cast it to the graph's type ({self.signature()})"
                ) from exc
        try:
            outputs = self._session.run(None, arrays)
        except Exception as exc:
            if type(exc).__name__ != "InvalidArgument":
                raise
            first = str(exc).strip().splitlines()[0]
            raise InvalidArgumentError(
                f"{self.path.name} takes ({self.signature()}); onnxruntime refused the inputs: "
                f"{first}"
            ) from exc
        tensors = tuple(torch.from_numpy(o).to(self._device) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def train(self, mode: bool = True) -> OnnxModule:
        """An ONNX graph runs inference only: ``train(False)`` is accepted, ``train()`` is not.

        Raises:
            InvalidStateError: ``mode`` is True.
        """
        if mode:
            raise InvalidStateError(
                f"{self.path.name} is an ONNX graph, which runs inference only; train the "
                "PyTorch model and export it again"
            )
        return super().train(False)

    def to(self, *args: Any, **kwargs: Any) -> OnnxModule:  # type: ignore[override]
        """Run the graph on another device (``"cpu"`` or ``"cuda"``); dtypes cannot change.

        Raises:
            DeviceError: onnxruntime here cannot run on that device.
            InvalidArgumentError: a dtype was given.
        """
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            raise InvalidArgumentError(
                f"{self.path.name} is an ONNX graph, whose dtypes were fixed when it was "
                f"exported; export the model in {dtype} instead of casting the graph"
            )
        if device is not None and torch.device(device) != self._device:
            self._open(torch.device(device))
        return self

    def cuda(self, device: int | torch.device | None = None) -> OnnxModule:
        """Run the graph with onnxruntime's CUDA provider (see :meth:`to`)."""
        index = device.index if isinstance(device, torch.device) else device
        return self.to(torch.device("cuda", index or 0))

    def cpu(self) -> OnnxModule:
        """Run the graph on the CPU."""
        return self.to(torch.device("cpu"))


def load_onnx(path: Path, device: torch.device, trust: bool) -> OnnxModule:
    """Open an ONNX file as an :class:`OnnxModule` on ``device``.

    Args:
        path: the ``.onnx`` file (its external-data files beside it).
        device: ``cpu`` or ``cuda[:i]``.
        trust: skip the check that external-data files stay inside the model's folder.

    Raises:
        MissingDependencyError: onnxruntime (or, without trust, onnx) is not installed.
        UnsafeFileError: without trust, the weights name files outside the folder.
        DeviceError: onnxruntime here cannot run on ``device``.
        CorruptFileError: the graph cannot be loaded.
    """
    require_onnxruntime(f"loading the ONNX graph {str(path)!r}")
    if not trust:
        check_external_data(path)
    return OnnxModule(path, device)


__all__ = ["INSTALL", "OnnxModule", "load_onnx", "looks_like_onnx", "require_onnxruntime"]
