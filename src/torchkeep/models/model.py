"""Models without their pickles: save_model / load_model / load_for_inference.

``save_model`` writes the weights as safetensors plus, in the metadata, the class's import path
and its constructor arguments as JSON. ``load_model`` takes that class from a module that is
already imported (importing one only when the caller trusts the file), checks it is an
``nn.Module`` subclass before calling anything, builds it and loads the weights. It also
rebuilds whole-model pickles made of torch.nn's own layers (safely), user classes only when the
caller trusts the file, and TorchScript and torch.export archives, which run code by design,
only when the caller trusts the file. ONNX graphs load as modules that run them through
onnxruntime (see :mod:`torchkeep.models.onnx_runtime`).
"""

from __future__ import annotations

import functools
import importlib
import inspect as _pyinspect
import json
import os
import re
import sys
import types
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from torchkeep._common import SAFETENSORS_SUFFIX, PathLike, unwrap
from torchkeep._device import check_device
from torchkeep.errors import (
    CorruptFileError,
    InvalidArgumentError,
    InvalidStateError,
    ModelRebuildError,
    TorchkeepWarning,
    UnknownFormatError,
    UnsafeFileError,
)
from torchkeep.formats._base import OpenOptions
from torchkeep.formats.registry import (
    SAFETENSORS,
    SHARDED,
    TORCH_EXPORT,
    TORCH_LEGACY,
    TORCH_ZIP,
    TORCHSCRIPT,
    detect,
)
from torchkeep.formats.safetensors import SafetensorsSource
from torchkeep.formats.sharded import find_index, read_index
from torchkeep.models.onnx_runtime import load_onnx, looks_like_onnx
from torchkeep.safety import bounded_json as _json
from torchkeep.safety.contain import member
from torchkeep.safety.stubs import find_stubs, is_module_like
from torchkeep.safety.unpickle import safe_torch_load
from torchkeep.storage.locate import needs_staging, readable, writable
from torchkeep.weights.api import load, save, state_of
from torchkeep.weights.assign import check_floating

MODEL_KEY = "torchkeep.model"
_INIT_ATTR = "_torchkeep_init"
_FORMAT_VERSION = 1

ModuleType = TypeVar("ModuleType", bound=type[torch.nn.Module])


# --------------------------------------------------------------------------- constructor args


def _describe(obj: object) -> str:
    """``the class Foo`` or ``a function``, for messages about what was passed."""
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    return f"a {type(obj).__name__}"


def record_init(cls: ModuleType) -> ModuleType:
    """Class decorator: remember the arguments each instance was constructed with.

    ``save_model`` then needs no ``init=``. Only JSON-friendly arguments can be saved
    (numbers, strings, booleans, None, lists, tuples and dicts of those).

    Example:
        >>> @torchkeep.record_init
        ... class Net(nn.Module):
        ...     def __init__(self, width: int = 64) -> None: ...
        >>> torchkeep.save_model(Net(width=128), "net.safetensors")
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise InvalidStateError(
            f"@record_init decorates nn.Module subclasses, not {_describe(cls)}; put it on "
            "the line above 'class YourModel(nn.Module):'"
        )
    original = cls.__init__
    signature = _pyinspect.signature(original)

    @functools.wraps(original)
    def __init__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # A subclass's __init__ calling super().__init__ must not record the parent's call.
        if type(self) is cls:
            bound = signature.bind(self, *args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(signature.parameters)))
            object.__setattr__(self, _INIT_ATTR, arguments)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        if "__tuple__" in value:
            raise InvalidStateError(f"init argument {where} uses the reserved key '__tuple__'")
        return {k: _encode(v, f"{where}.{k}") for k, v in value.items()}
    raise InvalidStateError(
        f"init argument {where} is a {type(value).__name__}, which cannot be stored as JSON; "
        "pass plain values (numbers, strings, lists, dicts) to the constructor, or build "
        "that object inside __init__ from plain values"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    return value


_FROM_ATTRIBUTES = "the model's attributes named like the constructor's parameters"
_HOW_TO_RECORD = (
    "pass the constructor's arguments with save_model(model, path, init={...}), or decorate "
    "the class with @torchkeep.record_init so they are recorded when the model is built"
)


def _init_of(model: torch.nn.Module, init: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The constructor arguments to record, and where they came from (for messages).

    Without ``init=`` or :func:`record_init`, an argument is taken from the attribute of the
    same name when the constructor stored it there (``self.width = width``) and it differs
    from the default; :func:`_checked_init` then tells whether that was enough.
    """
    if init is not None:
        return dict(init), "init="
    recorded = getattr(model, _INIT_ATTR, None)
    if isinstance(recorded, dict):
        return recorded, "@record_init"
    parameters = list(_pyinspect.signature(type(model).__init__).parameters.values())[1:]
    attributes = vars(model)
    found: dict[str, Any] = {}
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "training":
            continue
        if p.name not in attributes:
            continue
        value = attributes[p.name]
        try:
            _encode(value, p.name)
        except InvalidStateError:
            continue  # not a plain value, so not what the constructor was given
        if p.default is p.empty or not _same(value, p.default):
            found[p.name] = value
    required = [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in found
    ]
    if required:
        raise InvalidStateError(
            f"{type(model).__qualname__}.__init__ needs {', '.join(required)}, which the model "
            f"does not keep as attributes of the same names; {_HOW_TO_RECORD}"
        )
    return found, _FROM_ATTRIBUTES


def _same(value: Any, default: Any) -> bool:
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # a default whose == is not a plain comparison
        return False


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    try:
        return {name: tuple(t.shape) for name, t in state_of(model).items()}
    except InvalidStateError:  # a rebuilt module without tensors: nothing to compare
        return {}


def _layer_types(model: torch.nn.Module) -> dict[str, type]:
    """Each submodule's class by name; compiled submodules and their insides are left out."""
    return {
        name: type(module)
        for name, module in model.named_modules()
        if "_orig_mod" not in name.split(".") and not hasattr(module, "_orig_mod")
    }


def _rebuild_problems(module: torch.nn.Module, init: dict[str, Any]) -> list[str]:
    """How ``type(module)(**init)`` differs from ``module``: empty when it rebuilds it.

    The class is built with the arguments as ``load_model`` will see them (after the JSON
    round trip) on the meta device, which allocates nothing; a constructor that cannot run
    there is built on the CPU, as ``load_model`` would (the global RNG state is put back, so
    saving does not change a training run's random numbers). State-dict names and shapes and
    the layer classes are compared.
    """
    cls = type(module)
    spec = _decode(json.loads(json.dumps(_encode(init, "init"))))
    try:
        with torch.random.fork_rng(devices=[]):
            try:
                with torch.device("meta"):
                    rebuilt = cls(**spec)
            except Exception:  # a constructor that needs real data
                rebuilt = cls(**spec)
    except Exception as exc:  # the user's constructor: anything it raises is the answer
        return [f"building it raised {type(exc).__name__}: {exc}"]
    own, new = _shapes(module), _shapes(rebuilt)
    problems = [f"{n} is missing" for n in own if n not in new]
    problems += [f"{n} is extra" for n in new if n not in own]
    problems += [
        f"{n} is {list(new[n])}, not {list(shape)}"
        for n, shape in own.items()
        if n in new and new[n] != shape
    ]
    own_types, new_types = _layer_types(module), _layer_types(rebuilt)
    problems += [
        f"layer {n or '(the root)'} is a {new_types[n].__name__}, not a {kind.__name__}"
        for n, kind in own_types.items()
        if n in new_types and new_types[n] is not kind
    ]
    return problems


def _checked_init(module: torch.nn.Module, init: Mapping[str, Any] | None) -> dict[str, Any]:
    """The constructor arguments to record, verified to rebuild ``module`` (see save_model)."""
    cls = type(module)
    arguments, source = _init_of(module, init)
    problems = _rebuild_problems(module, arguments)
    # Attributes that share a parameter's name need not hold what it was given.
    if problems and arguments and source == _FROM_ATTRIBUTES and not _rebuild_problems(module, {}):
        warnings.warn(
            f"save_model: {cls.__qualname__}'s attributes {sorted(arguments)} do not rebuild "
            "the model as constructor arguments, but the default arguments do; recording "
            f"init={{}}. If the model was built with other arguments, {_HOW_TO_RECORD}.",
            TorchkeepWarning,
            stacklevel=3,
        )
        return {}
    if problems:
        listed = "; ".join(problems[:6])
        if len(problems) > 6:
            listed += f"; and {len(problems) - 6} more"
        call = f"{cls.__qualname__}(**{arguments!r})" if arguments else f"{cls.__qualname__}()"
        raise InvalidStateError(
            f"refusing to save {cls.__qualname__} with save_model: {call} (arguments from "
            f"{source}) does not rebuild this model ({listed}), so load_model would fail on "
            f"the file. To fix it, {_HOW_TO_RECORD}. If layers were replaced after the model "
            "was built, no constructor call rebuilds it: save the weights with "
            "torchkeep.save(model, path) and build the model in code."
        )
    return arguments


# ------------------------------------------------------------------------------- save_model


def save_model(
    model: torch.nn.Module,
    path: PathLike,
    *,
    init: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | str | None = None,
) -> Path | str:
    """Save weights plus what rebuilds the model: its class's import path and init arguments.

    No pickle: the file is safetensors (or a sharded safetensors folder) whose metadata holds
    ``torchkeep.model`` = ``{"class": "package.module:Class", "init": {...}}``.

    The constructor arguments come from ``init=``, else from :func:`record_init`, else from
    the model's attributes named like the constructor's parameters (``self.width = width``)
    where they differ from the defaults. Before anything is written, the class is built with
    those arguments on the meta device (nothing is allocated) and must give the same
    state-dict names and shapes and the same layer classes as ``model``; otherwise nothing is
    written and :class:`~torchkeep.errors.InvalidStateError` says to pass ``init=`` — a file
    that ``load_model`` cannot rebuild is never written. (When attributes were guessed wrong
    but the default arguments rebuild the model, the defaults are recorded with a
    :class:`~torchkeep.TorchkeepWarning`.) Arguments that change no layer or shape, such as a
    dropout rate, cannot be checked this way: pass them with ``init=`` or use
    :func:`record_init`.

    Args:
        model: the module (wrappers are removed).
        path: a ``.safetensors`` file, or a folder when ``max_shard_size`` is given.
        init: keyword arguments for the class's constructor. Optional when the class is
            decorated with :func:`record_init`, its constructor needs no arguments, or it
            keeps them as attributes of the same names.
        metadata: extra strings stored alongside.
        max_shard_size: shard the weights into a folder.

    Raises:
        InvalidStateError: the class cannot be imported by name (defined inside a function),
            the init arguments are not JSON-friendly or missing, or the class built with them
            does not rebuild ``model`` (names, shapes or layer classes differ).

    Example:
        >>> torchkeep.save_model(Net(width=128), "net.safetensors", init={"width": 128})
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidStateError(
            f"save_model saves an nn.Module and how to rebuild it, got a {type(model).__name__}"
            + (
                "; save a state dict with torchkeep.save(state_dict, path)"
                if isinstance(model, Mapping)
                else ""
            )
        )
    if needs_staging(path):
        with writable(path) as local:
            save_model(model, local, init=init, metadata=metadata, max_shard_size=max_shard_size)
        return os.fspath(path)
    module = unwrap(model)
    cls = type(module)
    if "<locals>" in cls.__qualname__:
        raise InvalidStateError(
            f"{cls.__qualname__} is defined inside a function, so it cannot be imported by "
            "name when loading; move it to module level"
        )
    target = Path(path)
    if max_shard_size is None and target.suffix.lower() != SAFETENSORS_SUFFIX:
        raise InvalidArgumentError(
            f"save_model writes .safetensors files, got {str(target)!r}; name the file "
            "'<name>.safetensors', or pass max_shard_size= to write a sharded folder"
        )
    record = {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "init": _encode(_checked_init(module, init), "init"),
        "version": _FORMAT_VERSION,
        "torch": torch.__version__,
    }
    text = {**(metadata or {}), MODEL_KEY: json.dumps(record, sort_keys=True)}
    return Path(save(module, target, metadata=text, max_shard_size=max_shard_size))


# ------------------------------------------------------------------------------- load_model


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _import_class(spec: str, *, trust: bool, path: Path) -> type[torch.nn.Module]:
    """The class a ``torchkeep.model`` record names, imported only when the caller trusts it.

    Without trust, only a module that is already imported is used, and the class is looked up
    in its namespace (``vars``), so no module code and no ``__getattr__`` hook runs.
    """
    module_name, sep, qualname = spec.partition(":")
    if not sep or not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(qualname):
        raise CorruptFileError(
            f"{str(path)!r}: metadata {MODEL_KEY} names the class {spec[:200]!r}, which is not "
            "of the form 'package.module:Class'"
        )
    hint = (
        " It was defined in a script (__main__): move it to an importable module, or pass "
        "cls=YourClass to load_model."
        if module_name == "__main__"
        else " If it moved, pass cls=TheClass to load_model, or install the package that "
        "defines it."
    )
    module = sys.modules.get(module_name)
    if not isinstance(module, types.ModuleType):
        if not trust:
            raise UnsafeFileError(
                f"{str(path)!r} names its model class {spec!r}, from the module "
                f"{module_name!r}, which is not imported; importing it would run code that the "
                "file chose. Nothing was imported. If you trust the file, pass trust=True (or "
                f"import {module_name} yourself first); otherwise pass cls=YourModel to build "
                "a class you choose, or take the weights with torchkeep.load_state_dict(path).",
                path=str(path),
                globals=(f"{module_name}.{qualname}",),
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelRebuildError(
                f"cannot import the model class {spec!r}: {exc}.{hint}"
            ) from exc
    obj: Any = module
    for part in qualname.split("."):
        if trust:
            found = getattr(obj, part, _MISSING)
        else:
            namespace = vars(obj) if isinstance(obj, (types.ModuleType, type)) else {}
            found = namespace.get(part, _MISSING)
        if found is _MISSING:
            raise ModelRebuildError(
                f"cannot import the model class {spec!r}: {module_name} has no {qualname}.{hint}"
            )
        obj = found
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise UnsafeFileError(
            f"refusing {str(path)!r}: its model record names {spec!r}, a "
            f"{type(obj).__name__}, not an nn.Module subclass, so it is not called. Build the "
            "model yourself and load its weights with load_model(path, cls=YourModel) or "
            "torchkeep.load(model, path).",
            path=str(path),
            globals=(f"{module_name}.{qualname}",),
        )
    return obj


_MISSING = object()


def _model_record(path: Path) -> dict[str, Any] | None:
    """The ``torchkeep.model`` record of a safetensors file or sharded folder, if any."""
    if path.is_dir():
        index = find_index(path)
        if index is None:
            return None
        first = sorted(set(read_index(index).values()))[0]
        path = member(path, first, path=str(index), what="shard", flat=True)
    with SafetensorsSource(path, OpenOptions()) as source:
        raw = source.metadata.get(MODEL_KEY)
    if raw is None:
        return None
    record = _json.loads(raw, path=str(path), what=f"metadata {MODEL_KEY}")
    if not isinstance(record, dict) or not isinstance(record.get("class"), str):
        raise CorruptFileError(f"{str(path)!r}: metadata {MODEL_KEY} names no class")
    return record


_RUNS_CODE = {
    "torchscript": (
        "a TorchScript archive: loading it as a model compiles and runs the code stored in the "
        "file (its methods, __setstate__ included)"
    ),
    "torch-export": (
        "a torch.export archive: loading it as a model deserialises and runs the program stored "
        "in the file, and unpickles the objects it carries"
    ),
}


def _load_archive(path: Path, kind: str, device: str, trust: bool) -> torch.nn.Module:
    if not trust:
        raise UnsafeFileError(
            f"{str(path)!r} is {_RUNS_CODE[kind]}. Nothing was run. If you trust whoever made "
            "the file, pass trust=True. Otherwise take just its weights, which torchkeep reads "
            "without running anything: torchkeep.load_state_dict(path), or build your own "
            "model class and call torchkeep.load(model, path) (or load_model(path, "
            "cls=YourModel)).",
            path=str(path),
        )
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location=device
            )
        return scripted
    module = torch.export.load(str(path)).module()
    return module.to(device) if device != "cpu" else module


def _load_onnx_graph(
    path: Path, cls: type[torch.nn.Module] | None, device: torch.device, trust: bool, train: bool
) -> torch.nn.Module:
    """An ONNX file as a module that runs its graph with onnxruntime (no trust needed)."""
    if cls is not None:
        raise InvalidArgumentError(
            f"{str(path)!r} is an ONNX graph, whose weights torchkeep does not load into a "
            "class; call load_model(path) without cls= to run the graph with onnxruntime, or "
            "load the PyTorch checkpoint the graph was exported from"
        )
    if train:
        raise InvalidArgumentError(
            f"{str(path)!r} is an ONNX graph, which runs inference only; drop train=True"
        )
    return load_onnx(path, device, trust)


def _pickled_model(path: Path, trust: bool, allow_globals: Iterable[str]) -> torch.nn.Module:
    try:
        obj = safe_torch_load(
            str(path),
            map_location="cpu",
            trust=trust,
            allow_globals=allow_globals,
            stubs=True,
            torch_nn=True,
        )
    except (ImportError, AttributeError) as exc:
        # Only reachable when trusted: the pickle named a class that no longer exists.
        raise ModelRebuildError(
            f"{str(path)!r} names a class that cannot be imported here ({exc}). Take the "
            "weights with torchkeep.load_state_dict(path), which needs no classes, and build "
            "the model in code."
        ) from exc
    candidates: list[Any]
    if is_module_like(obj):
        candidates = [obj]
    elif isinstance(obj, Mapping):
        ordered = sorted(obj, key=lambda k: k not in ("model", "module", "net"))
        candidates = [obj[k] for k in ordered if is_module_like(obj[k])]
    else:
        candidates = []
    if not candidates:
        raise ModelRebuildError(
            f"{str(path)!r} holds weights but no model; build the model yourself and call "
            "torchkeep.load(model, path), or pass cls=YourModel to load_model"
        )
    chosen = candidates[0]
    # Every object is looked at: a wrapper of torch.nn's own (DataParallel) may hold a user
    # class deep inside.
    missing = find_stubs(chosen, limit=1 << 62)
    if missing:
        raise UnsafeFileError(
            f"{str(path)!r} is a pickled model whose classes are not torch.nn's own: "
            f"{', '.join(missing)}. Nothing was imported or executed. If you trust the file "
            "and these classes are importable, pass trust=True (or allow_globals=[...] with "
            "those names); otherwise pass the class to build, load_model(path, "
            "cls=YourModel), or take the weights with torchkeep.load_state_dict(path): "
            "neither runs anything from the file.",
            path=str(path),
            globals=tuple(missing),
        )
    if not isinstance(chosen, torch.nn.Module):
        raise ModelRebuildError(f"{str(path)!r}: the model object is not an nn.Module")
    # torch.save(nn.DataParallel(model)) pickles the wrapper: hand back the model itself.
    return unwrap(chosen)


def load_model(
    path: PathLike,
    *,
    cls: type[torch.nn.Module] | None = None,
    device: str | torch.device | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    train: bool = False,
    sha256: str | None = None,
    check_hash: bool = False,
) -> torch.nn.Module:
    """Rebuild a working model from a file, without its pickle where possible.

    Accepts files from :func:`save_model` (the recorded class is taken from an already
    imported module, or imported with ``trust=True``, and checked to be an ``nn.Module``
    subclass before it is called), whole-model pickles from ``torch.save(model)`` (rebuilt
    safely when every class is torch.nn's own; user classes only with ``trust=True``),
    TorchScript archives and torch.export ``.pt2`` archives (these run code from the file, so
    only with ``trust=True``; with ``cls`` their weights are loaded into that class instead),
    ONNX graphs (recognised by their bytes, run through onnxruntime by a module that takes and
    returns tensors; no trust needed, as onnxruntime runs no code from the file), and plain
    weight files when ``cls`` says what to build.

    Args:
        path: the file or folder.
        cls: the model class to build (overrides the recorded one; needed for plain weights).
        device: where the model goes (default CPU).
        trust: allow the file to run code: its pickle's classes, the module its record names,
            a TorchScript or torch.export program. For an ONNX graph, skip the check that its
            external weight files lie inside its folder.
        allow_globals: extra ``"module.name"`` globals the allowlist accepts.
        train: leave the model in training mode (default: ``eval()``).
        sha256: the file's expected SHA-256 (hex, or a prefix of it).
        check_hash: take the expected hash prefix from the file name (torch.hub style).

    ``path`` may be an ``http(s)://`` URL (downloaded once into ``$TORCHKEEP_CACHE``) or an
    fsspec URL (``s3://...``).

    Returns:
        The model, in eval mode unless ``train=True``.

    Raises:
        ModelRebuildError: the class cannot be imported, is not a module, or the file holds
            no model.
        UnsafeFileError: without ``trust``: the pickle needs classes outside torch.nn, the
            record names a module that is not imported, the file is a TorchScript or
            torch.export archive, or an ONNX graph reads weights from outside its folder.
        MissingDependencyError: an ONNX graph, and onnxruntime (or onnx) is not installed.
        DeviceError: an ONNX graph on a device this onnxruntime cannot use.
    """
    if isinstance(path, torch.nn.Module):
        raise InvalidStateError(
            "load_model takes a path and builds the model from it, got a "
            f"{type(path).__name__}; to load weights into a model you have, call "
            "torchkeep.load(model, path), or torchkeep.load_for_inference(model)"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidStateError(
            f"load_model takes a path to a file or folder, got a {type(path).__name__}"
        )
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise InvalidStateError(
            f"cls= takes an nn.Module subclass to build, got {_describe(cls)}; pass the class "
            "itself (cls=Net), not an instance or a function"
        )
    if needs_staging(path, sha256, check_hash):
        with readable(path, sha256=sha256, check_hash=check_hash) as local:
            return load_model(
                local,
                cls=cls,
                device=device,
                trust=trust,
                allow_globals=allow_globals,
                train=train,
            )
    where = Path(os.fspath(path))
    target = str(check_device(device, f"load {str(where)!r}"))
    try:
        resolved, fmt = detect(where)
    except UnknownFormatError:
        # ONNX has no magic number, so it is tried only after every format that has one.
        if not looks_like_onnx(where):
            raise
        return _load_onnx_graph(where, cls, torch.device(target), trust, train)
    model: torch.nn.Module
    if fmt in (TORCHSCRIPT, TORCH_EXPORT) and cls is None:
        model = _load_archive(resolved, fmt.name, target, trust)
        try:
            return model.train(train)
        except (NotImplementedError, RuntimeError):
            return model  # torch.export modules fix their mode at export time
    if fmt in (SAFETENSORS, SHARDED):
        record = _model_record(resolved)
        if cls is None and record is None:
            raise ModelRebuildError(
                f"{str(where)!r} holds weights only (it was not written by save_model); pass "
                "cls=YourModel, or build the model and call torchkeep.load(model, path)"
            )
        build = cls or _import_class(record["class"] if record else "", trust=trust, path=where)
        init = _decode(record.get("init", {})) if record else {}
        model = build(**init)
        load(model, where)
    elif cls is not None:
        model = cls()
        load(model, where, trust=trust, allow_globals=allow_globals)
    elif fmt in (TORCH_ZIP, TORCH_LEGACY):
        model = _pickled_model(resolved, trust, allow_globals)
    else:
        raise ModelRebuildError(f"{str(where)!r} ({fmt.name}) holds no model to rebuild")
    model.to(target)
    return model.train(train)


# ------------------------------------------------------------------------ load_for_inference


def training_layers(model: torch.nn.Module) -> list[str]:
    """Names of dropout and batch-norm layers that are in training mode."""
    kinds = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
    return [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, kinds) and module.training
    ]


def warn_if_training(model: torch.nn.Module, doing: str) -> None:
    """The tutorials' classic: inference with dropout and batch norm still in training mode."""
    layers = training_layers(model)
    if layers:
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        warnings.warn(
            f"{doing} a model in training mode: {shown} behave differently in training "
            "(random dropout, batch statistics). Call model.eval() first, or use "
            "torchkeep.load_for_inference(model).",
            TorchkeepWarning,
            stacklevel=3,
        )


def load_for_inference(
    model_or_path: torch.nn.Module | PathLike,
    path: PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cls: type[torch.nn.Module] | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
) -> torch.nn.Module:
    """A model ready for inference: loaded, moved, ``eval()``, gradients off.

    Three forms: ``load_for_inference(path)`` rebuilds the model with :func:`load_model`
    (an ``.onnx`` graph becomes a module that runs it with onnxruntime on the CPU, or with its
    CUDA provider for ``device="cuda"``);
    ``load_for_inference(model, path)`` loads the file's weights into your model with
    :func:`torchkeep.load` (strictly: every name and shape must match); and
    ``load_for_inference(model)`` prepares a model you already loaded.

    Args:
        model_or_path: a module, or anything :func:`load_model` accepts.
        path: with a module first, the file whose weights to load into it.
        device: where to run (``"cuda"``, ``"cpu"``, ...).
        dtype: cast floating-point weights (for example ``torch.float16``).
        cls: passed to :func:`load_model` for plain weight files.
        trust: passed to :func:`load_model` or :func:`torchkeep.load`.
        allow_globals: extra ``"module.name"`` globals the allowlist accepts, likewise.

    Returns:
        The module, with every parameter's ``requires_grad`` False.

    Raises:
        KeyMismatchError: with a module and a path, the file's names or shapes do not match
            the module (nothing was loaded).

    Example:
        >>> model = torchkeep.load_for_inference(Net(), "checkpoint.pt")
    """
    if device is not None:
        check_device(device, "move the model")
    if dtype is not None:
        check_floating(dtype, "load_for_inference")
    if path is not None and not isinstance(model_or_path, torch.nn.Module):
        swapped = isinstance(path, torch.nn.Module)
        raise InvalidStateError(
            "arguments are swapped: call load_for_inference(model, path)"
            if swapped
            else "load_for_inference(model, path) takes the model to load into first, got a "
            f"{type(model_or_path).__name__}; to rebuild the model from a file, call "
            "load_for_inference(path)"
        )
    if path is not None and cls is not None:
        raise InvalidArgumentError(
            "cls= says which class to build from a file, but a model was given to load "
            "into; drop cls=, or call load_for_inference(path, cls=YourModel)"
        )
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
        if path is not None:
            load(model, path, device=device, dtype=dtype, trust=trust, allow_globals=allow_globals)
    elif isinstance(model_or_path, (str, os.PathLike)):
        model = load_model(model_or_path, cls=cls, trust=trust, allow_globals=allow_globals)
    else:
        raise InvalidStateError(
            "load_for_inference takes an nn.Module or a path, got a "
            f"{type(model_or_path).__name__}"
            + (
                "; a state dict needs a model: build it, then torchkeep.load(model, path)"
                if isinstance(model_or_path, Mapping)
                else ""
            )
        )
    if device is not None:
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    try:
        model.eval()
    except NotImplementedError:
        pass  # torch.export modules fix their mode at export time
    except RuntimeError as exc:
        if "not supported" not in str(exc):
            raise
    for parameter in model.parameters():  # ScriptModules refuse module.requires_grad_()
        parameter.requires_grad_(False)
    return model
