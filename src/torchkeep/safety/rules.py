"""What a pickle may reach, and what each allowed name may do.

Every global a pickle names is looked up here. Values (dtypes, layouts, ``torch.Tensor`` as a
type) are returned as they are; allowed callables are returned too, but the machine only ever
calls them through a *checker* that validates the arguments first (a tensor view must fit its
storage, a ``bytearray`` is built from bytes and never from a length, a ``numpy`` array has no
object dtype); everything else becomes an inert stub class and is recorded, with a verdict, so
the caller can refuse the file naming every offending global at once. BUILD is accepted only on
instances of a few plain-data classes, stubs, and whatever the caller explicitly allowed.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import contextlib
import copyreg
import datetime
import importlib
import operator
import pathlib
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch

from torchkeep.errors import ModelRebuildError
from torchkeep.safety.checks import (
    DICT_TYPES,
    PLAIN_CLASSES,
    AttributeDict,
    Checker,
    StorageKind,
    args_,
    build_ndarray,
    build_np_dtype,
    bytearray_,
    bytes_,
    complex_,
    counter,
    datetime_value,
    defaultdict,
    deque,
    device_,
    encode,
    frozenset_,
    get_layout,
    jagged_table,
    list_of,
    namespace,
    no_data,
    np_dtype,
    np_frombuffer,
    np_reconstruct,
    np_scalar,
    ordered_dict,
    path_,
    plain_state,
    rebuild_from_type_v2,
    rebuild_nested_tensor,
    rebuild_parameter,
    rebuild_parameter_with_state,
    rebuild_qtensor,
    rebuild_sparse_tensor,
    rebuild_tensor,
    rebuild_tensor_v2,
    rebuild_tensor_v3,
    reconstructor,
    restore_type_tag,
    set_,
    size_,
    slice_or_range,
    subscript,
    tensor_,
    timedelta_value,
    timezone_value,
    torch_version,
    unsupported_tensor,
)
from torchkeep.safety.stubs import StubObject, derived_stub, stub_class
from torchkeep.safety.vm import Refusal

Verdict = Literal["safe", "unknown", "dangerous"]


def _numpy_table() -> dict[str, tuple[Any, Checker | None]]:
    try:
        import numpy as np
    except ImportError:  # a dependency, but the reader must not need it
        return {}
    table: dict[str, tuple[Any, Checker | None]] = {
        "numpy.ndarray": (np.ndarray, None),
        "numpy.dtype": (np.dtype, np_dtype),
    }
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        module = sys.modules.get(core)
        if module is None:
            try:
                module = importlib.import_module(core)
            except ImportError:
                continue
        table[f"{core}._reconstruct"] = (module._reconstruct, np_reconstruct)
        table[f"{core}.scalar"] = (module.scalar, np_scalar)
        numeric = sys.modules.get(core.replace("multiarray", "numeric"))
        if numeric is not None and hasattr(numeric, "_frombuffer"):
            table[f"{numeric.__name__}._frombuffer"] = (numeric._frombuffer, np_frombuffer)
    return table


_STAND_INS = {
    name: (AttributeDict, None)
    for name in (
        "lightning.fabric.utilities.data.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
    )
}


def _table() -> dict[str, tuple[Any, Checker | None]]:
    """``module.name`` -> (the object, its argument checker or ``None`` for a plain value)."""
    u = torch._utils
    table: dict[str, tuple[Any, Checker | None]] = {
        "collections.OrderedDict": (collections.OrderedDict, ordered_dict),
        "collections.Counter": (collections.Counter, counter),
        "collections.defaultdict": (collections.defaultdict, defaultdict),
        "collections.deque": (collections.deque, deque),
        "copyreg._reconstructor": (copyreg._reconstructor, reconstructor),  # type: ignore[attr-defined]
        "_codecs.encode": (__import__("_codecs").encode, encode),
        "builtins.set": (set, set_),
        "builtins.frozenset": (frozenset, frozenset_),
        "builtins.bytearray": (bytearray, bytearray_),
        "builtins.bytes": (bytes, bytes_),
        "builtins.complex": (complex, complex_),
        "builtins.slice": (slice, slice_or_range(slice)),
        "builtins.range": (range, slice_or_range(range)),
        "builtins.object": (object, None),
        "argparse.Namespace": (argparse.Namespace, namespace(argparse.Namespace)),
        "types.SimpleNamespace": (types.SimpleNamespace, namespace(types.SimpleNamespace)),
        "datetime.datetime": (datetime.datetime, datetime_value(datetime.datetime)),
        "datetime.date": (datetime.date, datetime_value(datetime.date)),
        "datetime.time": (datetime.time, datetime_value(datetime.time)),
        "datetime.timedelta": (datetime.timedelta, timedelta_value),
        "datetime.timezone": (datetime.timezone, timezone_value),
        # Plain data in hyper-parameters: a type annotation, torch.__version__.
        "typing.Any": (typing.Any, None),
        "torch.torch_version.TorchVersion": (torch.torch_version.TorchVersion, torch_version),
        # Type aliases pickle as operator.getitem(typing.Union, (int, str)); only ever applied
        # to stand-ins, never really called.
        "_operator.getitem": (operator.getitem, subscript),
        "operator.getitem": (operator.getitem, subscript),
        "torch.Size": (torch.Size, size_),
        "torch.device": (torch.device, device_),
        "torch.Tensor": (torch.Tensor, None),
        "torch.nn.parameter.Parameter": (torch.nn.Parameter, None),
        "torch.serialization._get_layout": (torch.serialization._get_layout, get_layout),
        "torch._utils._rebuild_tensor_v2": (u._rebuild_tensor_v2, rebuild_tensor_v2),
        "torch._utils._rebuild_tensor": (u._rebuild_tensor, rebuild_tensor),
        "torch._utils._rebuild_parameter": (u._rebuild_parameter, rebuild_parameter),
        "torch._utils._rebuild_parameter_with_state": (
            u._rebuild_parameter_with_state,
            rebuild_parameter_with_state,
        ),
        "torch._utils._rebuild_qtensor": (u._rebuild_qtensor, rebuild_qtensor),
        "torch._tensor._rebuild_from_type_v2": (
            torch._tensor._rebuild_from_type_v2,
            rebuild_from_type_v2,
        ),
    }
    for name in ("list", "dict", "tuple", "int", "float", "bool", "str"):
        table[f"builtins.{name}"] = (__import__("builtins").__dict__[name], None)
    for name in ("_rebuild_meta_tensor_no_storage",):
        table[f"torch._utils.{name}"] = (getattr(u, name), no_data)
    for name in (
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_device_tensor_from_cpu_tensor",
        "_rebuild_wrapper_subclass",
        "_rebuild_mkldnn_tensor",
    ):
        if hasattr(u, name):
            table[f"torch._utils.{name}"] = (getattr(u, name), unsupported_tensor)
    table["torch._utils._rebuild_tensor_v3"] = (u._rebuild_tensor_v3, rebuild_tensor_v3)
    table["torch._utils._rebuild_sparse_tensor"] = (u._rebuild_sparse_tensor, rebuild_sparse_tensor)
    table["torch._utils._rebuild_nested_tensor"] = (u._rebuild_nested_tensor, rebuild_nested_tensor)
    table.update(jagged_table())
    for kind in (pathlib.PurePosixPath, pathlib.PureWindowsPath):
        for module in ("pathlib", "pathlib._local"):
            table[f"{module}.{kind.__name__}"] = (kind, path_(kind))
    # Concrete paths are rebuilt as pure ones: the same text, no file-system methods.
    for module in ("pathlib", "pathlib._local"):
        table[f"{module}.PosixPath"] = (pathlib.PosixPath, path_(pathlib.PurePosixPath))
        table[f"{module}.WindowsPath"] = (pathlib.WindowsPath, path_(pathlib.PureWindowsPath))
    jit = "torch.jit._pickle"
    table[f"{jit}.build_intlist"] = (f"{jit}.build_intlist", list_of((int,), "build_intlist"))
    table[f"{jit}.build_doublelist"] = (
        f"{jit}.build_doublelist",
        list_of((float,), "build_doublelist"),
    )
    table[f"{jit}.build_boollist"] = (f"{jit}.build_boollist", list_of((bool,), "build_boollist"))
    table[f"{jit}.build_tensorlist"] = (
        f"{jit}.build_tensorlist",
        list_of((torch.Tensor, torch.nn.Parameter), "build_tensorlist"),
    )
    table[f"{jit}.restore_type_tag"] = (f"{jit}.restore_type_tag", restore_type_tag)
    for value in vars(torch).values():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            table[str(value)] = (value, None)
    for name, value in vars(torch).items():
        if name.endswith("Storage") and isinstance(value, type) and name != "UntypedStorage":
            try:
                dtype = torch.serialization._get_dtype_from_pickle_storage_type(name)  # type: ignore[attr-defined]
            except KeyError:
                continue
            table[f"torch.{name}"] = (StorageKind(dtype), None)
    table["torch.UntypedStorage"] = (StorageKind(torch.uint8), None)
    # Dtypes without a typed storage class (float8, uint16, ...) are pickled on this one.
    table["torch.storage.UntypedStorage"] = table["torch.UntypedStorage"]
    table.update(_numpy_table())
    table.update(_STAND_INS)
    return table


# The jit builders are named, not imported (torch.jit would import much of torch's compiler):
# the table holds their names as stand-in objects, unique per name.
_TABLE: dict[str, tuple[Any, Checker | None]] | None = None


def table() -> dict[str, tuple[Any, Checker | None]]:
    """The allowlist: ``module.name`` -> (object, checker)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
        _TABLE.update({k: (_Named(k), c) for k, (v, c) in _TABLE.items() if isinstance(v, str)})
    return _TABLE


class _Named:
    """A callable the allowlist names without importing (TorchScript's list builders)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def modern_name(module: str, name: str) -> tuple[str, str]:
    """Translate Python 2 module names the way pickle's ``fix_imports`` would."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return module, name


# -- classification --------------------------------------------------------------------------

# Modules whose members can run code, import, touch files or the network, or build callables.
DANGEROUS_MODULES = frozenset(
    """
    os posix nt sys subprocess shutil socket importlib runpy pty code codeop ctypes pickle
    _pickle marshal dill cloudpickle joblib types webbrowser urllib http ftplib smtplib
    telnetlib requests httpx multiprocessing threading _thread signal tempfile io _io codecs
    functools _functools operator _operator inspect pdb bdb timeit trace cProfile profile
    asyncio concurrent selectors select mmap fcntl resource gc atexit glob fileinput zipfile
    tarfile shelve dbm sqlite3 site sysconfig distutils setuptools pip venv ensurepip zipimport
    pkgutil imp builtins posixpath ntpath zipapp linecache tokenize ast sympy yaml pydoc xmlrpc
    socketserver ssl logging
    """.split()  # noqa: SIM905 - a word list reads best as words
)
DANGEROUS_PREFIXES = (
    "torch.hub",
    "torch.jit",
    "torch.package",
    "torch.fx",
    "torch.utils.cpp_extension",
    "torch.utils.data",
    "torch._dynamo",
    "torch._inductor",
    "torch.serialization",
    "torch.storage",
    "torch.load",
    "torch.save",
    "torch.export",
    "torch.distributed.rpc",
    "torch._C._jit",
    "numpy.load",
    "numpy.save",
    "numpy.loadtxt",
    "numpy.fromfile",
    "numpy.testing",
    "numpy.f2py",
    "numpy.distutils",
    "numpy.ctypeslib",
    "numpy.lib.npyio",
    "numpy.lib._npyio_impl",
    "pandas.read_pickle",
    "pandas.io",
)
DANGEROUS_NAMES = frozenset(
    """
    system popen popen2 popen3 spawn spawnl spawnv spawnve spawnvp execl execle execlp execv
    execve execvp eval exec compile open __import__ import_module getattr setattr delattr load
    loads save dump dumps run call check_call check_output Popen remove unlink rmdir rmtree
    rename replace write write_text write_bytes touch mkdir makedirs chmod chown kill fork
    startfile urlopen urlretrieve create_connection read_pickle load_module exec_module run_path
    run_module interact attrgetter methodcaller itemgetter partial reduce apply breakpoint input
    globals locals vars from_file fromfile memmap
    """.split()  # noqa: SIM905 - a word list reads best as words
)


def classify(qualname: str) -> Verdict:
    """What a global a pickle names can do: ``safe``, ``unknown`` or ``dangerous``.

    ``safe`` means torchkeep's allowlist (with its argument checks); ``dangerous`` anything
    that can run code, import, touch files or the network however it is spelled (``os.system``,
    ``torch.os.system``, ``builtins.getattr``, a dunder attribute, a module); ``unknown``
    everything else, usually a class from the author's code (it becomes an inert stub).
    """
    module, _, name = qualname.rpartition(".")
    module, name = modern_name(module, name)
    full = f"{module}.{name}"
    if full in table():
        return "safe"
    if is_torch_nn_global(full, resolve=False):
        return "unknown"
    parts = full.split(".")
    # A class defined in the script that saved the file lives in __main__; the module name
    # is not an attribute, but any dunder after it is.
    first = 1 if parts[0] in ("__main__", "__torch__") else 0
    if any(p.startswith("__") and p.endswith("__") for p in parts[first:]):
        return "dangerous"
    if full.startswith("__torch__.") and not set(parts[1:]) & DANGEROUS_NAMES:
        return "unknown"  # TorchScript's own classes
    if full.startswith("torch.jit._pickle."):
        return "unknown"
    for prefix in DANGEROUS_PREFIXES:
        if full == prefix or full.startswith(prefix + "."):
            return "dangerous"
    if parts[0] in DANGEROUS_MODULES or set(parts) & DANGEROUS_NAMES:
        return "dangerous"
    found = _static_lookup(parts)
    if found is not None:
        return found
    return "unknown"


def _static_lookup(parts: list[str]) -> Verdict | None:
    """Follow already-imported modules' namespaces (never importing, never ``__getattr__``)."""
    for cut in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:cut]))
        if obj is not None:
            break
    else:
        return None
    for attr in parts[cut:]:
        namespace = getattr(obj, "__dict__", None)
        if not isinstance(namespace, (dict, types.MappingProxyType)) or attr not in namespace:
            return None
        obj = namespace[attr]
        # A module itself, or a walk through a dangerous one.
        if isinstance(obj, types.ModuleType) and (
            obj.__name__.split(".")[0] in DANGEROUS_MODULES or attr == parts[-1]
        ):
            return "dangerous"
    origin = getattr(obj, "__module__", None) or ""
    if isinstance(origin, str) and origin.split(".")[0] in DANGEROUS_MODULES:
        return "dangerous"
    if isinstance(origin, str) and any(origin.startswith(p) for p in DANGEROUS_PREFIXES):
        return "dangerous"
    return None


def is_torch_nn_global(qualname: str, *, resolve: bool = True) -> bool:
    """True for torch.nn's own module classes and torch.nn.functional's functions."""
    module = qualname.rpartition(".")[0]
    if not module.startswith(("torch.nn.modules", "torch.nn.parallel", "torch.nn.functional")):
        return False
    if not resolve:
        return True
    obj = _resolve_existing(qualname)
    if isinstance(obj, type):
        return issubclass(obj, torch.nn.Module)
    return module == "torch.nn.functional" and callable(obj)


def _resolve_existing(qualname: str) -> Any:
    module_name, _, name = qualname.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    return vars(module).get(name)


def import_global(qualname: str) -> Any:
    """Import ``module.name`` that the caller explicitly allowed (attributes may be nested)."""
    module_name, _, name = qualname.rpartition(".")
    parts = module_name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in [*parts[cut:], name]:
            found = getattr(obj, attr, _ABSENT)
            if found is _ABSENT:
                raise ModelRebuildError(
                    f"allow_globals= allows {qualname!r}, which the file uses, but "
                    f"{'.'.join(parts[:cut])} has no {attr!r} here; install the version of "
                    "it that defines that name"
                )
            obj = found
        return obj
    raise ModelRebuildError(
        f"allow_globals= allows {qualname!r}, which the file uses, but no module of that name "
        "can be imported here; install the package that defines it"
    )


_ABSENT = object()


# -- the rules the machine runs under --------------------------------------------------------


class SafeRules:
    """The machine's rules for one file.

    Args:
        extra: globals the caller explicitly allowed; imported for real and used the way
            ``torch.serialization.safe_globals`` does (called, constructed, given state).
        torch_nn: torch.nn's module classes are real (constructed and given state).

    Attributes:
        refused: globals that became stubs, with their verdicts, in first-seen order.
        storages: ids of the storages persistent ids gave (tensors are built only on them).
    """

    def __init__(self, extra: Iterable[str] = (), *, torch_nn: bool = False) -> None:
        self.extra = frozenset(extra)
        self.torch_nn = torch_nn
        self.refused: dict[str, Verdict] = {}
        self.storages: dict[int, Any] = {}
        self._checkers: dict[int, tuple[Any, Checker]] = {}
        self._user: dict[int, Any] = {}
        self._nn: dict[int, Any] = {}

    def checker(self, func: Any) -> Checker | None:
        found = self._checkers.get(id(func))
        return found[1] if found is not None and found[0] is func else None

    def resolve(self, module: str, name: str) -> Any:
        module, name = modern_name(module, name)
        qualname = f"{module}.{name}"
        entry = table().get(qualname)
        if entry is not None:
            obj, check = entry
            if check is not None:
                self._checkers[id(obj)] = (obj, check)
            return obj
        if qualname in self.extra:
            obj = import_global(qualname)
            self._user[id(obj)] = obj
            return obj
        if self.torch_nn and is_torch_nn_global(qualname):
            obj = _resolve_existing(qualname)
            self._nn[id(obj)] = obj
            return obj
        self.refused.setdefault(qualname, classify(qualname))
        return stub_class(qualname)

    def _is_user(self, obj: Any) -> bool:
        return self._user.get(id(obj)) is obj

    def call(self, func: Any, args: tuple[Any, ...]) -> Any:
        with _explained(lambda: f"calls {_name(func)} with arguments torchkeep does not accept"):
            return self._call(func, args)

    def _call(self, func: Any, args: tuple[Any, ...]) -> Any:
        if isinstance(func, type) and issubclass(func, StubObject):
            return func(*args)
        if isinstance(func, StubObject):
            return derived_stub(func.stub_qualname, "()")(*args)
        check = self.checker(func)
        if check is not None:
            return check(self, args)
        if self._is_user(func):
            return func(*args)
        raise Refusal(f"calls {_name(func)}, which torchkeep never calls", plain=True)

    def new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with _explained(
            lambda: f"constructs {_name(cls)} from arguments torchkeep does not accept"
        ):
            return self._new(cls, args, kwargs)

    def _new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(cls, type) and issubclass(cls, StubObject):
            obj = cls(*args)
            if kwargs:
                obj.__dict__["_stub_kwargs"] = kwargs
            return obj
        if self._is_user(cls) and isinstance(cls, type):
            return cls.__new__(cls, *args, **kwargs)
        if kwargs:
            raise Refusal(f"constructs {_name(cls)} with keyword arguments", plain=True)
        if cls is torch.torch_version.TorchVersion:
            return torch_version(self, args)
        if cls is torch.nn.Parameter:
            args_(args, 1, 2, "Parameter")
            if len(args) == 2 and type(args[1]) is not bool:
                raise Refusal("requires_grad is not a boolean")
            return torch.nn.Parameter(tensor_(args[0]), *args[1:])
        if cls in PLAIN_CLASSES and not args:
            return cls.__new__(cls)  # type: ignore[call-overload]
        if self._nn.get(id(cls)) is cls and isinstance(cls, type) and not args:
            return cls.__new__(cls)  # type: ignore[call-overload]
        raise Refusal(f"constructs {_name(cls)}, which torchkeep never constructs", plain=True)

    def build(self, obj: Any, state: Any) -> None:
        with _explained(
            lambda: f"sets the state of {_name(type(obj))} objects to something refused"
        ):
            self._build(obj, state)

    def _build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
            raise Refusal(f"sets attributes on {_name(obj)}", plain=True)
        if isinstance(obj, StubObject):
            if isinstance(state, dict) or (isinstance(state, tuple) and len(state) == 2):
                # Not an attribute dict: kept whole as _stub_state.
                with contextlib.suppress(Refusal):
                    state = plain_state(state)
            obj.__setstate__(state)
            return
        if type(obj) in PLAIN_CLASSES:
            vars(obj).update(plain_state(state))
            return
        np = sys.modules.get("numpy")
        if np is not None and type(obj) is np.ndarray:
            build_ndarray(obj, state)
            return
        if np is not None and isinstance(obj, np.dtype):
            build_np_dtype(obj, state)
            return
        if self._nn.get(id(type(obj))) is type(obj):
            obj.__setstate__(plain_state(state))
            return
        if self._is_user(type(obj)):
            if hasattr(obj, "__setstate__"):
                obj.__setstate__(state)
                return
            # As pickle does: the dict part straight into __dict__, slots through setattr.
            slots = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            if state:
                vars(obj).update(plain_state(state))
            for key, value in plain_state(slots).items():
                setattr(obj, key, value)
            return
        raise Refusal(
            f"sets the state of {_name(type(obj))} objects, which torchkeep never does", plain=True
        )

    def container(self, obj: Any, kind: str) -> bool:
        if isinstance(obj, StubObject):
            return kind in ("list", "dict")
        if kind == "dict":
            return type(obj) in DICT_TYPES
        if kind == "list":
            return type(obj) in (list, collections.deque)
        return type(obj) is set


@contextlib.contextmanager
def _explained(what: Callable[[], str]) -> Iterator[None]:
    """Turn an argument check's reason into a sentence about what the pickle does."""
    try:
        yield
    except Refusal as exc:
        if exc.corrupt or exc.plain:
            raise
        raise Refusal(f"{what()}: {exc}", plain=True) from None


class SurveyRules(SafeRules):
    """SafeRules that record what they refuse and carry on with an inert stand-in.

    Used to list everything a refused pickle references (a load stops at the first refusal,
    often a consequence of a stubbed global) and by ``scan``. Nothing more is allowed: a
    refused call or construction yields a stub, a refused BUILD does nothing.

    Attributes:
        problems: each refusal's reason, first seen first.
        used: every global the pickle names, first seen first.
    """

    def __init__(self, extra: Iterable[str] = (), *, torch_nn: bool = False) -> None:
        super().__init__(extra, torch_nn=torch_nn)
        self.problems: list[Refusal] = []
        self.used: dict[str, None] = {}

    def resolve(self, module: str, name: str) -> Any:
        value = super().resolve(module, name)
        self.used.setdefault(".".join(modern_name(module, name)), None)
        return value

    def _refused(self, exc: Refusal) -> Any:
        self.problems.append(exc)
        return stub_class("torchkeep.refused")()

    def call(self, func: Any, args: tuple[Any, ...]) -> Any:
        try:
            return super().call(func, args)
        except Refusal as exc:
            return self._refused(exc)

    def new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return super().new(cls, args, kwargs)
        except Refusal as exc:
            return self._refused(exc)

    def build(self, obj: Any, state: Any) -> None:
        try:
            super().build(obj, state)
        except Refusal as exc:
            self._refused(exc)


def _name(obj: Any) -> str:
    if isinstance(obj, StubObject):
        return f"an instance of {obj.stub_qualname}"
    if isinstance(obj, type) and issubclass(obj, StubObject):
        return obj.stub_qualname
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return f"a {type(obj).__name__}"
