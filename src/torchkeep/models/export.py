"""Export for deployment: torch.export, TorchScript or ONNX, each checked against eager.

Every export writes its artifact atomically, loads it back the way a deployment would, runs it
on the example inputs and compares with the eager model, so a silently wrong export (a traced
branch, an op the exporter approximates) shows up as a number rather than in production.

The batch dimension (dim 0 of every tensor input whose first size is the example's batch) is
dynamic by default in ``.pt2`` and ``.onnx`` artifacts, and the check runs at two batch sizes:
the example's and another built by repeating the example along dim 0. A model whose code fixes
the batch size is exported with static shapes instead, with a warning that says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.text import Text
from torch.export import Dim
from torch.utils._pytree import tree_flatten, tree_map

from torchkeep._common import PathLike, unwrap
from torchkeep.errors import ExportError, InvalidArgumentError, InvalidStateError, TorchkeepWarning
from torchkeep.models.model import warn_if_training
from torchkeep.models.onnx_runtime import INSTALL, OnnxModule
from torchkeep.storage.local import atomic_file
from torchkeep.storage.locate import needs_staging, writable
from torchkeep.weights.render import Block, Line, Rendered

FORMATS = ("export", "torchscript", "onnx")
_SUFFIXES = {".pt2": "export", ".onnx": "onnx", ".ts": "torchscript", ".torchscript": "torchscript"}
_NAMES = {"export": "torch.export", "torchscript": "TorchScript", "onnx": "ONNX"}
# The name of dim 0 in ONNX graphs (and in messages).
BATCH = "batch"
# How much bigger than the example the second checked batch is.
_BATCH_STEP = 3
# Above this many bytes of weights, ONNX keeps them in a '<name>.data' file beside the graph
# (protobuf cannot hold 2 GiB); below it the artifact is one file.
_ONNX_INLINE_LIMIT = 1 << 30

DynamicDims = Mapping[str | int, Mapping[int, str]]


@dataclass(frozen=True, repr=False)
class ExportResult(Rendered):
    """What :func:`export` wrote and how closely the artifact matches the eager model.

    ``print(result)`` is one line (:meth:`summary`), shown the same by ``rich.print`` and in
    notebooks.

    Attributes:
        path: the artifact.
        format: ``"export"``, ``"torchscript"`` or ``"onnx"``.
        method: how it was produced (``torch.export``, ``script``, ``trace``, ``onnx``).
        max_abs_diff: the largest absolute difference between the artifact's outputs and the
            eager model's, over every batch size checked.
        ok: whether every output matched within ``atol``/``rtol`` at every batch size checked.
        atol: absolute tolerance used.
        rtol: relative tolerance used.
        note: anything worth knowing (why scripting fell back to tracing, why the batch
            dimension is static, which batch sizes the artifact accepts).
        batch_sizes: the batch sizes the artifact was checked at: the example's, then a second
            one when the batch dimension is dynamic; empty when the inputs have no batch
            dimension (no tensor with at least one dimension).
        dynamic_batch: whether the artifact takes other batch sizes than the example's.
    """

    path: str
    format: str
    method: str
    max_abs_diff: float
    ok: bool
    atol: float
    rtol: float
    note: str = ""
    batch_sizes: tuple[int, ...] = ()
    dynamic_batch: bool = False

    def summary(self) -> str:
        """One line: the artifact, how it was made and whether it matches the eager model."""
        verdict = "matches" if self.ok else "DOES NOT MATCH"
        sizes = " and ".join(map(str, self.batch_sizes))
        if self.batch_sizes:
            where = f" at batch {sizes}" + ("" if self.dynamic_batch else " (static batch)")
        else:
            where = ""
        text = (
            f"{self.path} [{self.format} via {self.method}]: {verdict} the eager model{where} "
            f"(max abs diff {self.max_abs_diff:.3g}, atol {self.atol:g}, rtol {self.rtol:g})"
        )
        return text + (f"; {self.note}" if self.note else "")

    def blocks(self) -> list[Block]:
        """The description ``str()``, ``rich.print()`` and notebooks show: :meth:`summary`."""
        return [Line(Text(self.summary(), style="" if self.ok else "red"))]

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<ExportResult {self.summary()}>"


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


def _reason(exc: BaseException) -> str:
    """The one line of an exporter's error that says what went wrong."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(inner).splitlines()]
    lines = [line for line in lines if line]
    bullet = next((line.lstrip("- ") for line in lines if line.startswith("- ")), None)
    text = bullet or (lines[0] if lines else type(inner).__name__)
    # torch's advice names its own API (mark_dynamic, Dim.STATIC); torchkeep's options differ.
    return text.split(". If you")[0].rstrip(".")[:300]


# ------------------------------------------------------------------------- dynamic shapes


def _batch_of(inputs: tuple[Any, ...]) -> int | None:
    """The example's batch size: dim 0 of its first tensor with at least one dimension."""
    for leaf in tree_flatten(inputs)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.ndim:
            return int(leaf.shape[0])
    return None


def _batched(leaf: Any, batch: int | None) -> bool:
    return (
        batch is not None
        and isinstance(leaf, torch.Tensor)
        and bool(leaf.ndim)
        and leaf.shape[0] == batch
    )


def _resized(inputs: tuple[Any, ...], batch: int, size: int) -> tuple[Any, ...]:
    """The example inputs with every batched tensor repeated or cut to ``size`` rows."""
    rows = torch.arange(size) % batch

    def resize(leaf: Any) -> Any:
        return leaf.index_select(0, rows.to(leaf.device)) if _batched(leaf, batch) else leaf

    resized: tuple[Any, ...] = tree_map(resize, inputs)
    return resized


def _user_dims(
    module: torch.nn.Module, inputs: tuple[Any, ...], dynamic_dims: DynamicDims | None
) -> dict[int, dict[int, str]]:
    """``dynamic_dims`` checked and keyed by input position, dims made non-negative."""
    if not dynamic_dims:
        return {}
    if not isinstance(dynamic_dims, Mapping):
        raise InvalidArgumentError(
            "dynamic_dims maps an input's name (or position) to {dim: name}, for example "
            f"dynamic_dims={{'x': {{1: 'seq'}}}}; got a {type(dynamic_dims).__name__}"
        )
    parameters = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    named = ", ".join(repr(p) for p in parameters[: len(inputs)]) or "(none)"
    found: dict[int, dict[int, str]] = {}
    for key, dims in dynamic_dims.items():
        if isinstance(key, str) and key in parameters[: len(inputs)]:
            position = parameters.index(key)
        elif isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(inputs):
            position = key
        else:
            raise InvalidArgumentError(
                f"dynamic_dims names the input {key!r}, which is not one of the example inputs; "
                f"use a name of forward's parameters ({named}) or a position below {len(inputs)}"
            )
        tensor = inputs[position]
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgumentError(
                f"dynamic_dims names the input {key!r}, a {type(tensor).__name__}; it applies "
                "to tensor inputs (dim 0 of nested tensors is dynamic with the batch)"
            )
        if not isinstance(dims, Mapping):
            raise InvalidArgumentError(
                f"dynamic_dims[{key!r}] maps dimensions to names, e.g. {{1: 'seq'}}; got a "
                f"{type(dims).__name__}"
            )
        for dim, name in dims.items():
            if (
                isinstance(dim, bool)
                or not isinstance(dim, int)
                or not -tensor.ndim <= dim < tensor.ndim
            ):
                raise InvalidArgumentError(
                    f"dynamic_dims[{key!r}] names dimension {dim!r}, but that input has "
                    f"{tensor.ndim} dimensions (shape {list(tensor.shape)})"
                )
            if not isinstance(name, str) or not name.isidentifier():
                raise InvalidArgumentError(
                    f"dynamic_dims[{key!r}][{dim}] is {name!r}; name a dimension with an "
                    "identifier such as 'seq' (equal names mean equal sizes)"
                )
            dim %= tensor.ndim
            if name == BATCH and dim != 0:
                raise InvalidArgumentError(
                    f"dynamic_dims[{key!r}] calls dimension {dim} {BATCH!r}, the name of dim "
                    "0; choose another name"
                )
            found.setdefault(position, {})[dim] = name
    return found


def _shape_spec(
    inputs: tuple[Any, ...], batch: int | None, user: dict[int, dict[int, str]], onnx: bool
) -> tuple[Any, ...] | None:
    """``dynamic_shapes`` for torch.export and the ONNX exporter, or None when all is static.

    The batch is ``Dim.DYNAMIC`` (for ONNX its name, which the exporter turns into
    ``Dim.DYNAMIC`` and writes into the graph): dynamic wherever the model allows, an error
    where its code fixes the size. Named dimensions are one ``Dim`` per name, so equal names
    mean equal sizes.
    """
    named: dict[str, Any] = {}
    marker: Any = BATCH if onnx else Dim.DYNAMIC
    dynamic = False

    def leaf(x: Any) -> dict[int, Any] | None:
        nonlocal dynamic
        if _batched(x, batch):
            dynamic = True
            return {0: marker}
        return None

    specs: list[Any] = []
    for position, arg in enumerate(inputs):
        if isinstance(arg, torch.Tensor):
            spec = leaf(arg) or {}
            for dim, name in user.get(position, {}).items():
                spec[dim] = named.setdefault(name, Dim(name))
                dynamic = True
            specs.append(spec or None)
        else:
            specs.append(tree_map(leaf, arg))
    return tuple(specs) if dynamic else None


@contextlib.contextmanager
def _size_oblivious(enabled: bool) -> Iterator[bool]:
    """Trace sizes 0 and 1 like any other, as the ONNX exporter does for every model.

    torch.export fixes a dimension whose example size is 0 or 1, so an example with batch 1
    would give a program that takes batch 1 only. Yields whether the setting was applied (it
    is absent from older torch versions).
    """
    config = getattr(torch.fx.experimental, "_config", None)
    if not enabled or not hasattr(config, "backed_size_oblivious"):
        yield False
        return
    with config.patch(backed_size_oblivious=True):  # type: ignore[union-attr]
        yield True


def _batch_range(
    program: Any, inputs: tuple[Any, ...], batch: int | None
) -> tuple[int, int | None] | None:
    """The batch sizes an exported program takes, ``(low, high or None)``; None: static."""
    if batch is None:
        return None
    user = set(program.graph_signature.user_inputs)
    values = [
        node.meta.get("val")
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user
    ]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    leaves = [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor)]
    low, high = 0, None
    for leaf, value in zip(leaves, tensors, strict=False):
        if not _batched(leaf, batch):
            continue
        size = value.shape[0]
        if not isinstance(size, torch.SymInt):
            return None
        bounds = program.range_constraints.get(size.node.expr)
        if bounds is None:
            continue
        low = max(low, int(bounds.lower))
        try:
            upper = int(bounds.upper)
        except (TypeError, ValueError, AttributeError, OverflowError):  # int_oo: no bound
            continue
        high = upper if high is None else min(high, upper)
    return low, high


def _second_batch(batch: int, bounds: tuple[int, int | None]) -> int | None:
    """Another batch size the artifact should take: the example's plus a few, within bounds."""
    low, high = bounds
    for size in (batch + _BATCH_STEP, high, batch - 1):
        if (
            size is not None
            and size != batch
            and size >= max(low, 1)
            and (high is None or size <= high)
        ):
            return size
    return None


# ------------------------------------------------------------------------------- exporters


@dataclass(frozen=True)
class _Artifact:
    """An artifact loaded back: how to run it, and what the exporter did."""

    run: Callable[..., Any]
    method: str
    bounds: tuple[int, int | None] | None  # the batch sizes it takes; None: static
    note: str = ""


def _export_program(
    model: torch.nn.Module, inputs: tuple[Any, ...], path: Path, shapes: Any, small: bool
) -> _Artifact:
    with _size_oblivious(small and shapes is not None) as oblivious:
        program = torch.export.export(model, inputs, dynamic_shapes=shapes)
    with atomic_file(path) as temp:
        torch.export.save(program, str(temp))
    reloaded = torch.export.load(str(path)).module()
    note = (
        "the example has a dimension of size 0 or 1, which torch.export fixes; traced "
        "size-obliviously so that other sizes work (an example batch of 2 or more avoids this)"
        if oblivious
        else ""
    )
    return _Artifact(
        reloaded,
        "torch.export",
        _batch_range(program, inputs, _batch_of(inputs)) if shapes is not None else None,
        note,
    )


def _export_torchscript(model: torch.nn.Module, inputs: tuple[Any, ...], path: Path) -> _Artifact:
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
    # TorchScript fixes no input shape (a trace can still freeze sizes into its arithmetic,
    # which the check at a second batch size shows).
    return _Artifact(reloaded, method, (0, None), note)


def _save_onnx(program: Any, path: Path) -> None:
    """Write an ONNX program atomically: one file, or the graph plus '<name>.data'."""
    graph = program.model.graph
    weights = sum(
        v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None
    )
    with atomic_file(path) as temp:
        if weights <= _ONNX_INLINE_LIMIT:
            program.save(str(temp), external_data=False)
        else:
            # The data file gets its final name (the graph refers to it by that name); the
            # graph, written last, commits the pair.
            try:
                import onnx_ir as ir
            except ImportError:
                from onnxscript import ir  # type: ignore[no-redef]  # onnxscript < 0.3
            ir.save(program.model, str(temp), external_data=f"{path.name}.data")


def _export_onnx(
    model: torch.nn.Module, inputs: tuple[Any, ...], path: Path, shapes: Any, small: bool
) -> _Artifact:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            "ONNX export needs the optional packages onnx, onnxscript and onnxruntime: " + INSTALL
        ) from exc
    with warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, inputs, dynamo=True, verbose=False, dynamic_shapes=shapes
        )
    if program is None:  # only the legacy exporter returns nothing
        raise ExportError("the ONNX exporter returned no program")
    _save_onnx(program, path)
    exported = getattr(program, "exported_program", None)
    bounds = None
    if shapes is not None:
        bounds = (
            _batch_range(exported, inputs, _batch_of(inputs)) if exported is not None else (0, None)
        )
    return _Artifact(OnnxModule(path), "onnx", bounds)


def _produce(
    kind: str,
    model: torch.nn.Module,
    inputs: tuple[Any, ...],
    path: Path,
    batch: int | None,
    user: dict[int, dict[int, str]],
) -> _Artifact:
    """Export with a dynamic batch where asked; where the model fixes it, export statically."""
    if kind == "torchscript":
        artifact = _export_torchscript(model, inputs, path)
        if user:
            note = "TorchScript fixes no input shape, so dynamic_dims has nothing to do"
            artifact = dataclasses.replace(artifact, note=_join(artifact.note, note))
        return artifact if batch is not None else dataclasses.replace(artifact, bounds=None)
    exporter = _export_program if kind == "export" else _export_onnx
    onnx = kind == "onnx"
    small = any(
        size <= 1
        for position, dims in user.items()
        for size in (inputs[position].shape[d] for d in dims)
    ) or (batch is not None and batch <= 1)
    shapes = _shape_spec(inputs, batch, user, onnx)
    try:
        return exporter(model, _fresh(inputs), path, shapes, small)
    except Exception as exc:  # the exporters raise many types; the static retry decides
        if batch is None or _shape_spec(inputs, None, user, onnx) == shapes:
            raise
        reason = _reason(exc)
    artifact = exporter(model, _fresh(inputs), path, _shape_spec(inputs, None, user, onnx), small)
    note = (
        f"static batch: the exporter could not make the batch dimension dynamic ({reason}), "
        f"so the artifact takes batch {batch} only; pass dynamic_batch=False to ask for that, "
        "or change the model code that fixes the batch size"
    )
    warnings.warn(f"{path}: {note}", TorchkeepWarning, stacklevel=3)
    return dataclasses.replace(artifact, note=_join(artifact.note, note))


def _fresh(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """New tensor objects over the same data: torch.export marks the tensors it is given as
    dynamic and leaves the marks there when it fails, which would make a retry (and any later
    export of the caller's tensors) fail the same way."""
    fresh: tuple[Any, ...] = tree_map(
        lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor) else leaf, inputs
    )
    return fresh


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _run_and_compare(
    artifact: _Artifact, inputs: tuple[Any, ...], expected: Any, atol: float, rtol: float
) -> tuple[float, bool, str]:
    """The artifact's difference from ``expected``, and why it failed to run (or "")."""
    try:
        actual = artifact.run(*inputs)
    except Exception as exc:  # an artifact refusing a size raises whatever its runtime raises
        return math.inf, False, f"it raised {type(exc).__name__}: {_reason(exc)}"
    worst, ok = compare(expected, actual, atol, rtol)
    return worst, ok, ""


def export(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    path: PathLike,
    *,
    format: str | None = None,
    dynamic_batch: bool = True,
    dynamic_dims: DynamicDims | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` for deployment and check the artifact against the eager model.

    The model is exported in eval mode (and put back in its previous mode afterwards); a model
    left in training mode with dropout or batch norm triggers a warning. The artifact is
    written atomically, loaded back, run and compared with the eager model at the example's
    batch size and, when the batch dimension is dynamic, at a second one (the example's plus
    3, its tensors repeated along dim 0).

    The batch dimension is dim 0 of every tensor input whose first size equals the first
    tensor's. By default it is dynamic in ``.pt2`` and ``.onnx`` artifacts (named ``batch``
    in the ONNX graph); where the model's code fixes it (a reshape to a constant, a buffer
    with a batch dimension), the artifact is exported with static shapes instead and a
    :class:`~torchkeep.TorchkeepWarning` says why. TorchScript fixes no input shape.

    Args:
        model: the module (wrappers are removed).
        example_inputs: a tensor or a tuple of positional inputs.
        path: where the artifact goes; the format comes from the suffix (``.pt2``, ``.ts``,
            ``.onnx``) unless ``format`` is given.
        format: ``"export"`` (torch.export), ``"torchscript"`` (script, falling back to trace)
            or ``"onnx"`` (needs the onnx extra).
        dynamic_batch: make the batch dimension dynamic (default). ``False`` fixes every
            shape to the example's, and the check runs at the example's batch size only.
        dynamic_dims: other dynamic dimensions, by input name (a parameter of ``forward``)
            or position: ``{"x": {1: "seq"}}``. Equal names mean equal sizes; the name is the
            ONNX graph's. Unlike the batch, a named dimension that the model fixes is an
            error. Named dimensions are checked at their example sizes.
        atol: absolute tolerance of the equivalence check.
        rtol: relative tolerance of the equivalence check.

    Returns:
        An :class:`ExportResult`; ``result.ok`` says whether the check passed at every batch
        size in ``result.batch_sizes``.

    Raises:
        ExportError: the exporter failed (a dimension in ``dynamic_dims`` included), or ONNX
            support is not installed.
        InvalidStateError: ``model`` is not a module, or the arguments are out of order.
        InvalidArgumentError: the format is unknown or cannot be told from the suffix, or
            ``dynamic_dims`` names an input or dimension the example does not have.

    Example:
        >>> result = torchkeep.export(model, torch.randn(2, 16), "net.pt2")
        >>> result.batch_sizes, result.dynamic_batch
        ((2, 5), True)
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
            staged = export(
                model,
                example_inputs,
                local,
                format=format,
                dynamic_batch=dynamic_batch,
                dynamic_dims=dynamic_dims,
                atol=atol,
                rtol=rtol,
            )
        return dataclasses.replace(staged, path=os.fspath(path))
    target = Path(os.fspath(path))
    kind = _format_of(target, format)
    module = unwrap(model)
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    batch = _batch_of(inputs)
    user = _user_dims(module, inputs, dynamic_dims)
    warn_if_training(module, "exporting")
    with _eval_mode(module), torch.no_grad():
        expected = module(*inputs)
        try:
            artifact = _produce(
                kind, module, inputs, target, batch if dynamic_batch else None, user
            )
        except ExportError:
            raise
        except Exception as exc:  # exporters raise many unrelated types; keep the cause
            hint = (
                "; a dimension named in dynamic_dims may be fixed by the model's code: "
                "leave it out of dynamic_dims"
                if user
                else ""
            )
            raise ExportError(
                f"{_NAMES[kind]} export of {type(module).__name__} failed: {_reason(exc)}{hint}"
            ) from exc
        worst, ok, failure = _run_and_compare(artifact, inputs, expected, atol, rtol)
        note = _join(artifact.note, f"at batch {batch}: {failure}" if failure else "")
        sizes: tuple[int, ...] = (batch,) if batch is not None else ()
        second = (
            _second_batch(batch, artifact.bounds)
            if batch is not None and artifact.bounds is not None
            else None
        )
        if artifact.bounds is not None and artifact.bounds[1] is not None:
            low, high = max(artifact.bounds[0], 1), artifact.bounds[1]
            bounded = (
                f"the graph is correct for batch sizes {low} to {high} only: the model's code "
                "branches on the batch size, and onnxruntime does not check it"
                if kind == "onnx"
                else f"the program takes batch sizes {low} to {high} only (the model's code "
                "branches on the batch size; other sizes fail its guards)"
            )
            note = _join(note, bounded)
        if second is not None and batch is not None:
            resized = _resized(inputs, batch, second)
            try:
                expected_second = module(*resized)
            except Exception as exc:  # the model itself refuses that batch size
                note = _join(
                    note,
                    f"the eager model fails at batch {second} ({_reason(exc)}), "
                    "so only the example's batch was checked",
                )
            else:
                worst_second, ok_second, failure = _run_and_compare(
                    artifact, resized, expected_second, atol, rtol
                )
                worst, ok, sizes = max(worst, worst_second), ok and ok_second, (batch, second)
                if failure or not ok_second:
                    fix = (
                        "; tracing may have frozen the batch size: make the model scriptable, "
                        "or export to .pt2"
                        if artifact.method == "trace"
                        else ""
                    )
                    what = failure or f"max abs diff {worst_second:.3g}"
                    note = _join(note, f"at batch {second}: {what}{fix}")
    dynamic = artifact.bounds is not None and batch is not None
    result = ExportResult(
        str(target), kind, artifact.method, worst, ok, atol, rtol, note, sizes, dynamic
    )
    if not ok:
        warnings.warn(str(result), TorchkeepWarning, stacklevel=2)
    return result
