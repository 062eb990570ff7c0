"""Export for deployment: torch.export, TorchScript or ONNX, each checked against eager.

Every export writes its artifact atomically, loads it back the way a deployment would, runs it
on the example inputs and compares with the eager model, so a silently wrong export (a traced
branch, an op the exporter approximates) shows up as a number rather than in production.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchkeep._common import PathLike, unwrap
from torchkeep.errors import ExportError, InvalidArgumentError, InvalidStateError, TorchkeepWarning
from torchkeep.models.model import warn_if_training
from torchkeep.storage.local import atomic_file
from torchkeep.storage.locate import needs_staging, writable

FORMATS = ("export", "torchscript", "onnx")
_SUFFIXES = {".pt2": "export", ".onnx": "onnx", ".ts": "torchscript", ".torchscript": "torchscript"}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how closely the artifact matches the eager model.

    Attributes:
        path: the artifact.
        format: ``"export"``, ``"torchscript"`` or ``"onnx"``.
        method: how it was produced (``torch.export``, ``script``, ``trace``, ``onnx``).
        max_abs_diff: the largest absolute difference between the artifact's outputs and the
            eager model's on the example inputs.
        ok: whether every output matched within ``atol``/``rtol``.
        atol: absolute tolerance used.
        rtol: relative tolerance used.
        note: anything worth knowing (for example why scripting fell back to tracing).
    """

    path: str
    format: str
    method: str
    max_abs_diff: float
    ok: bool
    atol: float
    rtol: float
    note: str = ""

    def __str__(self) -> str:
        verdict = "matches" if self.ok else "DOES NOT MATCH"
        text = (
            f"{self.path} [{self.format} via {self.method}]: {verdict} the eager model "
            f"(max abs diff {self.max_abs_diff:.3g}, atol {self.atol:g}, rtol {self.rtol:g})"
        )
        return text + (f"; {self.note}" if self.note else "")


def _flatten(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for key in sorted(output) for t in _flatten(output[key])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flatten(item)]
    return []


def compare(expected: Any, actual: Any, atol: float, rtol: float) -> tuple[float, bool]:
    """Largest absolute difference over all output tensors, and whether all are close."""
    left, right = _flatten(expected), _flatten(actual)
    if len(left) != len(right) or not left:
        return math.inf, False
    worst, ok = 0.0, True
    for a, b in zip(left, right, strict=True):
        b = torch.as_tensor(b)
        if a.shape != b.shape:
            return math.inf, False
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        if a.numel():
            worst = max(worst, float((a - b).abs().max()))
        ok = ok and bool(torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True))
    return worst, ok


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library's progress logging (the ONNX exporter logs every step)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _format_of(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in FORMATS:
            raise InvalidArgumentError(
                f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}"
            )
        return format
    if path.suffix in _SUFFIXES:
        return _SUFFIXES[path.suffix]
    raise InvalidArgumentError(
        f"cannot tell the export format from {str(path)!r}: use .pt2 (torch.export), "
        ".ts (TorchScript) or .onnx, or pass format=..."
    )


def _export_program(model: torch.nn.Module, inputs: tuple[Any, ...], path: Path) -> tuple[Any, str]:
    program = torch.export.export(model, inputs)
    with atomic_file(path) as temp:
        torch.export.save(program, str(temp))
    reloaded = torch.export.load(str(path)).module()
    return reloaded(*inputs), "torch.export"


def _export_torchscript(
    model: torch.nn.Module, inputs: tuple[Any, ...], path: Path
) -> tuple[Any, str, str]:
    note = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            compiled: Any = torch.jit.script(model)
            method = "script"
        except Exception as exc:  # scripting fails in many ways on ordinary Python code
            reason = str(exc).strip().splitlines()[0][:160]
            note = f"scripting failed ({reason}); traced instead, so data-dependent control "
            note += "flow is frozen to the path the example inputs took"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", torch.jit.TracerWarning)  # type: ignore[attr-defined]
                compiled = torch.jit.trace(model, inputs)  # type: ignore[no-untyped-call]
            tracer = [str(w.message).splitlines()[0] for w in caught]
            if tracer:
                note += f"; tracer warned: {tracer[0][:160]}"
            method = "trace"
        with atomic_file(path) as temp:
            torch.jit.save(compiled, str(temp))
        reloaded = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    return reloaded(*inputs), method, note


def _export_onnx(model: torch.nn.Module, inputs: tuple[Any, ...], path: Path) -> tuple[Any, str]:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            "ONNX export needs the optional packages onnx, onnxscript and onnxruntime: "
            "pip install 'torchkeep[onnx]'"
        ) from exc
    with atomic_file(path) as temp, warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(temp), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, _flatten(inputs), strict=False)}
    outputs = [torch.from_numpy(o) for o in session.run(None, feed)]
    return outputs, "onnx"


def export(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    path: PathLike,
    *,
    format: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` for deployment and check the artifact against the eager model.

    The model is exported in eval mode (and put back in its previous mode afterwards); a model
    left in training mode with dropout or batch norm triggers a warning. The artifact is
    written atomically, loaded back, run on ``example_inputs`` and compared.

    Args:
        model: the module (wrappers are removed).
        example_inputs: a tensor or a tuple of positional inputs.
        path: where the artifact goes; the format comes from the suffix (``.pt2``, ``.ts``,
            ``.onnx``) unless ``format`` is given.
        format: ``"export"`` (torch.export), ``"torchscript"`` (script, falling back to trace)
            or ``"onnx"`` (needs the onnx extra).
        atol: absolute tolerance of the equivalence check.
        rtol: relative tolerance of the equivalence check.

    Returns:
        An :class:`ExportResult`; ``result.ok`` says whether the check passed.

    Raises:
        ExportError: the exporter failed, or ONNX support is not installed.
        InvalidStateError: ``model`` is not a module, or the arguments are out of order.
        InvalidArgumentError: the format is unknown or cannot be told from the suffix.
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidStateError(
            f"export takes the nn.Module to export first, got a {type(model).__name__}; call "
            "torchkeep.export(model, example_inputs, path)"
        )
    if not isinstance(path, (str, os.PathLike)):
        swapped = isinstance(example_inputs, (str, os.PathLike))
        raise InvalidStateError(
            f"export takes the artifact's path third, got a {type(path).__name__}"
            + ("; the inputs and the path are swapped" if swapped else "")
            + ": call torchkeep.export(model, example_inputs, path)"
        )
    if needs_staging(path):
        with writable(path) as local:
            staged = export(model, example_inputs, local, format=format, atol=atol, rtol=rtol)
        return dataclasses.replace(staged, path=os.fspath(path))
    target = Path(os.fspath(path))
    kind = _format_of(target, format)
    module = unwrap(model)
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    warn_if_training(module, "exporting")
    note = ""
    with _eval_mode(module), torch.no_grad():
        expected = module(*inputs)
        try:
            if kind == "export":
                actual, method = _export_program(module, inputs, target)
            elif kind == "torchscript":
                actual, method, note = _export_torchscript(module, inputs, target)
            else:
                actual, method = _export_onnx(module, inputs, target)
        except ExportError:
            raise
        except Exception as exc:  # exporters raise many unrelated types; keep the cause
            raise ExportError(
                f"{kind} export of {type(module).__name__} failed: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            ) from exc
    worst, ok = compare(expected, actual, atol, rtol)
    result = ExportResult(str(target), kind, method, worst, ok, atol, rtol, note)
    if not ok:
        warnings.warn(str(result), TorchkeepWarning, stacklevel=2)
    return result
