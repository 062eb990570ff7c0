"""The restricted unpickler: only allowlisted globals are ever resolved.

Pickles run code through the globals they reference (``os.system``, a class whose
``__reduce__`` does anything). Tensors, containers and a few harmless value types need only a
short, fixed list of globals, so every other global is refused before it is imported. Files are
scanned first, so a refusal names every offending global at once instead of the first one hit.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import copyreg
import dataclasses
import datetime
import importlib
import io
import pathlib
import pickle
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, Literal

import torch

from torchkeep._pickle_scan import GlobalRef, PickleScanError, scan_pickle_bytes, scan_torch_file
from torchkeep._stubs import contains_module, stub_class
from torchkeep.errors import CorruptFileError, DeviceError, UnsafeFileError

Verdict = Literal["safe", "unknown", "dangerous"]


class AttributeDict(dict[str, Any]):
    """Stands in for the attribute dicts some trainers pickle their hyperparameters in."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setstate__(self, state: Any) -> None:
        # Those dict subclasses pickle an (empty) instance __dict__; there is nothing to keep.
        pass


# Dict subclasses that only carry data: rebuilt as a plain-data stand-in instead of importing
# the framework that defined them.
_DATA_STAND_INS: dict[str, type] = {
    "lightning.fabric.utilities.data.AttributeDict": AttributeDict,
    "lightning_fabric.utilities.data.AttributeDict": AttributeDict,
    "pytorch_lightning.utilities.parsing.AttributeDict": AttributeDict,
    "lightning.pytorch.utilities.parsing.AttributeDict": AttributeDict,
}

_TORCH_REBUILD_FUNCTIONS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_nested_tensor",
    "_rebuild_device_tensor_from_cpu_tensor",
)

# Module prefixes whose globals can run commands, touch files or the network, or evaluate code.
_DANGEROUS_MODULES = (
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "pty",
    "code",
    "ctypes",
    "pickle",
    "_pickle",
    "marshal",
    "types",
    "webbrowser",
    "urllib",
    "http",
    "requests",
    "multiprocessing",
    "signal",
    "tempfile",
    "io",
    "codecs",
    "functools",
    "operator",
    "torch.storage._load_from_bytes",
    "torch.load",
    "torch.jit",
    "torch.hub",
    "numpy.load",
    "numpy.testing",
    "numpy.f2py",
)
_DANGEROUS_BUILTINS = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "open",
        "getattr",
        "setattr",
        "delattr",
        "__import__",
        "globals",
        "locals",
        "vars",
        "input",
        "breakpoint",
        "memoryview",
        "type",
    }
)


@lru_cache(maxsize=1)
def allowed_globals() -> dict[str, Any]:
    """Map every allowlisted ``module.name`` to the object it resolves to."""
    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "collections.defaultdict": collections.defaultdict,
        "collections.deque": collections.deque,
        "copyreg._reconstructor": copyreg._reconstructor,  # type: ignore[attr-defined]
        "_codecs.encode": __import__("_codecs").encode,
        "argparse.Namespace": argparse.Namespace,
        "types.SimpleNamespace": types.SimpleNamespace,
        "datetime.datetime": datetime.datetime,
        "datetime.date": datetime.date,
        "datetime.time": datetime.time,
        "datetime.timedelta": datetime.timedelta,
        "datetime.timezone": datetime.timezone,
        "pathlib.PosixPath": pathlib.PosixPath,
        "pathlib.PurePosixPath": pathlib.PurePosixPath,
        "pathlib.PureWindowsPath": pathlib.PureWindowsPath,
        "pathlib._local.PosixPath": pathlib.PosixPath,
        "pathlib._local.PurePosixPath": pathlib.PurePosixPath,
        "pathlib._local.PureWindowsPath": pathlib.PureWindowsPath,
        "torch.Size": torch.Size,
        "torch.Tensor": torch.Tensor,
        "torch.device": torch.device,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.nn.parameter.Buffer": torch.nn.Buffer,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "torch.storage.UntypedStorage": torch.UntypedStorage,
        "torch.storage.TypedStorage": torch.TypedStorage,
    }
    for name in (
        "set",
        "frozenset",
        "bytearray",
        "bytes",
        "complex",
        "slice",
        "range",
        "list",
        "dict",
        "tuple",
        "int",
        "float",
        "bool",
        "str",
        "object",
    ):
        allowed[f"builtins.{name}"] = getattr(__import__("builtins"), name)
    for name in _TORCH_REBUILD_FUNCTIONS:
        if hasattr(torch._utils, name):
            allowed[f"torch._utils.{name}"] = getattr(torch._utils, name)
    for value in vars(torch).values():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            allowed[str(value)] = value
    for name, value in vars(torch).items():
        # Legacy typed storages (torch.FloatStorage, ...); torch's own loader swaps them for a
        # dtype marker before they reach us, but a scan still lists them.
        if name.endswith("Storage") and isinstance(value, type):
            allowed[f"torch.{name}"] = value
    allowed.update(_numpy_globals())
    allowed.update(_DATA_STAND_INS)
    return allowed


def _numpy_globals() -> dict[str, Any]:
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but the unpickler must not need it
        return {}
    found: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            module = importlib.import_module(core)
        except ImportError:
            continue
        for name in ("_reconstruct", "scalar"):
            if hasattr(module, name):
                found[f"{core}.{name}"] = getattr(module, name)
    for name in dir(getattr(np, "dtypes", None)):
        value = getattr(np.dtypes, name)
        if isinstance(value, type) and issubclass(value, np.dtype):
            found[f"numpy.dtypes.{name}"] = value
    return found


def _modern_name(module: str, name: str) -> tuple[str, str]:
    """Translate Python 2 module names the way pickle's ``fix_imports`` would."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return module, name


def classify(qualname: str) -> Verdict:
    """Say whether a global a pickle references is safe, dangerous or unknown.

    Args:
        qualname: ``module.name`` as the pickle records it.

    Returns:
        ``"safe"`` for allowlisted globals, ``"dangerous"`` for ones that can run commands,
        evaluate code or touch files, ``"unknown"`` for everything else (usually a user's class).
    """
    module, _, name = qualname.rpartition(".")
    module, name = _modern_name(module, name)
    full = f"{module}.{name}"
    if full in allowed_globals():
        return "safe"
    if module == "builtins":
        return "dangerous" if name in _DANGEROUS_BUILTINS else "unknown"
    for prefix in _DANGEROUS_MODULES:
        if full == prefix or full.startswith(prefix + ".") or module == prefix:
            return "dangerous"
    return "unknown"


def _resolve(qualname: str) -> Any:
    """Import ``module.name`` the caller explicitly allowed (attributes may be nested)."""
    module_name, _, name = qualname.rpartition(".")
    parts = module_name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in [*parts[cut:], name]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {qualname!r}")


@dataclass(frozen=True)
class Policy:
    """Which globals an unpickler may resolve, beyond the allowlist.

    Attributes:
        extra: ``module.name`` globals the caller explicitly allowed (imported for real).
        stubs: other non-dangerous globals become inert stubs (see ``_stubs``).
        torch_nn: torch.nn's own module classes and functional ops are imported for real, so a
            whole-model pickle of plain torch.nn layers rebuilds into working modules.
    """

    extra: frozenset[str] = frozenset()
    stubs: bool = False
    torch_nn: bool = False

    def resolve(self, qualname: str) -> Any:
        """The object ``qualname`` stands for, or raise :class:`UnsafeFileError`."""
        allowed = allowed_globals()
        if qualname in allowed:
            return allowed[qualname]
        if qualname in self.extra:
            return _resolve(qualname)
        if self.torch_nn and is_torch_nn_global(qualname):
            return _resolve(qualname)
        if self.stubs and classify(qualname) != "dangerous":
            return stub_class(qualname)
        raise UnsafeFileError(
            f"the pickle references {qualname}, which is not on the allowlist; "
            "nothing was executed",
            globals=(qualname,),
        )

    def refused(self, refs: Iterable[GlobalRef]) -> list[str]:
        """The referenced globals this policy would not import for real."""
        out: dict[str, None] = {}
        for ref in refs:
            module, name = _modern_name(ref.module, ref.name)
            qualname = f"{module}.{name}"
            if qualname in allowed_globals() or qualname in self.extra:
                continue
            if self.torch_nn and is_torch_nn_global(qualname):
                continue
            out[qualname] = None
        return list(out)


def is_torch_nn_global(qualname: str) -> bool:
    """True for torch.nn's own module classes and torch.nn.functional's functions."""
    module = qualname.rpartition(".")[0]
    if not module.startswith(("torch.nn.modules", "torch.nn.parallel", "torch.nn.functional")):
        return False
    try:
        obj = _resolve(qualname)
    except (ImportError, AttributeError):
        return False
    if isinstance(obj, type):
        return issubclass(obj, torch.nn.Module)
    return module == "torch.nn.functional" and callable(obj)


def restricted_pickle_module(policy: Policy | None = None) -> types.ModuleType:
    """Build a module object with ``Unpickler`` and ``load`` that resolve only allowed globals.

    ``torch.load(pickle_module=...)`` takes it, so torch's own storage handling (zip records,
    legacy layout, ``map_location``) is reused while every global goes through the policy.
    """
    chosen = policy or Policy()

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module, name = _modern_name(module, name)
            return chosen.resolve(f"{module}.{name}")

    def load(file: BinaryIO, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    module = types.ModuleType("torchkeep_restricted_pickle")
    module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.__version__ = "1"  # type: ignore[attr-defined]
    return module


def unsafe_message(path: str, refused: list[str]) -> str:
    """The refusal text: what was refused, why, and the ways forward."""
    lines = [
        f"refusing to load {path!r}: its pickle references globals that are not on "
        "torchkeep's allowlist, and resolving them could run code. Nothing was executed.",
    ]
    for qualname in refused:
        verdict = classify(qualname)
        note = "  <- DANGEROUS: can run commands or evaluate code" if verdict == "dangerous" else ""
        lines.append(f"    {qualname}{note}")
    if any(classify(q) == "dangerous" for q in refused):
        lines.append("Do not load this file unless you wrote it yourself.")
    else:
        allow = ", ".join(repr(q) for q in refused)
        lines.append(
            "If you trust whoever wrote the file, pass trust=True, or allow just these names "
            f"with allow_globals=[{allow}]. To keep only the tensors, re-save the file with "
            "torchkeep.save(...) as .safetensors."
        )
    return "\n".join(lines)


def check_refs(label: str, path: str) -> None:
    """Scan a torch or pickle file and refuse it if it needs anything off the allowlist."""
    try:
        refs = scan_torch_file(path)
    except PickleScanError as exc:
        raise CorruptFileError(_scan_failure(label, exc)) from exc
    refused = Policy().refused(refs)
    if refused:
        raise UnsafeFileError(unsafe_message(label, refused), path=label, globals=tuple(refused))


def _plan(
    path: str, refs: list[GlobalRef], policy: Policy, stubs: bool
) -> tuple[Policy, list[str]]:
    """Refuse dangerous or (without stubs) unknown globals; else the policy to unpickle with."""
    refused = policy.refused(refs)
    if refused and (not stubs or any(classify(q) == "dangerous" for q in refused)):
        raise UnsafeFileError(unsafe_message(path, refused), path=path, globals=tuple(refused))
    return (dataclasses.replace(policy, stubs=True) if refused else policy), refused


def _check_stubbed(path: str, obj: Any, refused: list[str]) -> None:
    # Stubs are only accepted where they carry a model's tree; anything else that needed an
    # unknown class is refused as if stubs were off (nothing ran either way).
    if refused and not contains_module(obj):
        raise UnsafeFileError(unsafe_message(path, refused), path=path, globals=tuple(refused))


def safe_torch_load(
    path: str,
    *,
    map_location: Callable[[Any, str], Any] | str | None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    mmap: bool = False,
    stubs: bool = False,
    torch_nn: bool = False,
) -> Any:
    """``torch.load`` a torch zip or legacy file through the allowlist (or fully, when trusted).

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        trust: unpickle everything (the caller vouches for the file).
        allow_globals: extra globals imported for real.
        mmap: map zip storages instead of reading them.
        stubs: let unknown, non-dangerous classes become inert stubs, accepted only where
            they form a model's module tree (whole-model pickles).
        torch_nn: import torch.nn's own module classes for real.

    Raises:
        UnsafeFileError: the pickle needs globals that are not allowed (nothing executed).
        CorruptFileError: the file cannot be parsed.
    """
    policy = Policy(frozenset(allow_globals), torch_nn=torch_nn)
    refused: list[str] = []
    kwargs: dict[str, Any] = {"map_location": map_location, "weights_only": False}
    if not trust:
        try:
            refs = scan_torch_file(path)
        except PickleScanError as exc:
            raise CorruptFileError(_scan_failure(path, exc)) from exc
        policy, refused = _plan(path, refs, policy, stubs)
        kwargs["pickle_module"] = restricted_pickle_module(policy)
    if mmap:
        kwargs["mmap"] = True
    try:
        with warnings.catch_warnings():
            # Legacy whole-model files compare stored class sources; stubs have none.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            obj = torch.load(path, **kwargs)
    except UnsafeFileError as exc:
        raise UnsafeFileError(
            unsafe_message(path, list(exc.globals)), path=path, globals=exc.globals
        ) from exc
    except (
        RuntimeError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        OSError,
    ) as exc:
        if isinstance(exc, (FileNotFoundError, ImportError)) or _is_device_error(exc):
            raise
        if trust and isinstance(exc, AttributeError):
            raise  # a trusted pickle naming a class its module no longer has
        raise CorruptFileError(
            f"cannot load {path!r}: the file is damaged or truncated ({exc})"
        ) from exc
    _check_stubbed(path, obj, refused)
    return obj


def safe_pickle_load(
    data: bytes,
    *,
    path: str,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    stubs: bool = False,
    torch_nn: bool = False,
) -> Any:
    """Unpickle a plain pickle (``pickle.dump``) through the allowlist, or fully when trusted."""
    if trust:
        return pickle.loads(data)  # the caller declared the file trusted
    try:
        refs = scan_pickle_bytes(data)
    except PickleScanError as exc:
        raise CorruptFileError(_scan_failure(path, exc)) from exc
    policy, refused = _plan(path, refs, Policy(frozenset(allow_globals), torch_nn=torch_nn), stubs)
    try:
        obj = restricted_pickle_module(policy).Unpickler(io.BytesIO(data)).load()
    except UnsafeFileError as exc:
        raise UnsafeFileError(
            unsafe_message(path, list(exc.globals)), path=path, globals=exc.globals
        ) from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as exc:
        raise CorruptFileError(f"cannot unpickle {path!r}: {exc}") from exc
    _check_stubbed(path, obj, refused)
    return obj


def _scan_failure(path: str, exc: PickleScanError) -> str:
    where = f" at byte {exc.offset}" if exc.offset is not None else ""
    member = f" (in {exc.source})" if exc.source and exc.source != path else ""
    return f"{path!r} is damaged or truncated: {exc.reason}{where}{member}"


def _is_device_error(exc: BaseException) -> bool:
    return isinstance(exc, DeviceError) or isinstance(exc.__cause__, DeviceError)
