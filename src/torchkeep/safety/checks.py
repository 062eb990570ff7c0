"""Argument checks for the callables a pickle may use, one function per allowed name.

Each checker receives the rules of the file being read and the arguments the pickle passes,
validates them (types, bounds, sizes that agree with the bytes behind them), and only then
builds the value — mostly by calling torch's or Python's own constructor with arguments that
are known to be harmless. A :class:`~torchkeep.safety.vm.Refusal` says why not.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from torchkeep._tensor_parts import (
    QUANTIZED_DTYPES,
    SPARSE_LAYOUTS,
    check_channel_qparams,
    check_tensor_qparams,
    nested_from_buffer,
    sparse_from_parts,
)
from torchkeep._tensors import stand_in
from torchkeep.safety.stubs import StubObject, derived_stub, stub_class
from torchkeep.safety.vm import Refusal

if TYPE_CHECKING:
    from torchkeep.safety.rules import SafeRules

Checker = Callable[["SafeRules", tuple[Any, ...]], Any]
_T = TypeVar("_T")


class AttributeDict(dict[str, Any]):
    """Stands in for the attribute dicts some trainers pickle their hyperparameters in."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


@dataclass(frozen=True)
class StorageKind:
    """A legacy storage class named in a persistent id (``torch.FloatStorage``): its dtype."""

    dtype: torch.dtype


# -- the names and what they may do ---------------------------------------------------------

DICT_TYPES: tuple[type, ...] = (
    dict,
    collections.OrderedDict,
    collections.Counter,
    collections.defaultdict,
    AttributeDict,
)
# Classes whose instances only hold data in their __dict__; BUILD may fill it.
PLAIN_CLASSES: tuple[type, ...] = (
    argparse.Namespace,
    types.SimpleNamespace,
    collections.OrderedDict,
    collections.Counter,
    collections.defaultdict,
    AttributeDict,
)
FACTORIES = (None, list, dict, set, tuple, int, float, str, bool, collections.OrderedDict)
DEVICE = re.compile(r"[a-z_]{1,32}(:[0-9]{1,4})?")


def int_(value: Any, what: str, *, low: int = 0, high: int = 1 << 62) -> int:
    if type(value) is not int or not low <= value <= high:
        raise Refusal(f"{what} is {value!r}, not an integer in [{low}, {high}]")
    return value


def ints_(value: Any, what: str, limit: int = 64) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) > limit:
        raise Refusal(f"{what} is not a short tuple of integers")
    if all(type(v) is int for v in value) and (
        not value or 0 <= min(value) <= max(value) < 1 << 62
    ):
        return tuple(value)
    return tuple(int_(v, what) for v in value)  # raises, naming the bad value


def args_(args: tuple[Any, ...], low: int, high: int, what: str) -> None:
    if not low <= len(args) <= high:
        raise Refusal(f"{what} takes {low} to {high} arguments, not {len(args)}")


def no_hooks(hooks: Any) -> None:
    # torch 0.4 wrote None where later versions write an empty OrderedDict.
    if hooks is not None and (not isinstance(hooks, dict) or hooks):
        raise Refusal("a tensor carries backward hooks (callables)")


def plain_state(state: Any) -> dict[str, Any]:
    """An object's pickled attribute dict: string keys, none of them special names."""
    if state is None:
        return {}
    if (
        isinstance(state, tuple)
        and len(state) == 2
        and all(part is None or isinstance(part, dict) for part in state)
    ):
        merged: dict[str, Any] = {}
        for part in state:
            merged.update(part or {})
        state = merged
    if not isinstance(state, dict):
        raise Refusal(f"an object's state is a {type(state).__name__}, not a dict")
    for key in state:
        if type(key) is not str or (key.startswith("__") and key.endswith("__")):
            raise Refusal(f"an object's state sets the special attribute {key!r}")
    return state


# tensors


def storage_(rules: SafeRules, value: Any) -> torch.storage.TypedStorage:
    if id(value) not in rules.storages:
        raise Refusal("a tensor is built from something other than a storage of this file")
    return value  # type: ignore[no-any-return]


def check_view(
    storage: torch.storage.TypedStorage,
    offset: Any,
    size: Any,
    stride: Any,
    available: int | None = None,
) -> None:
    """Refuse a view that reaches past its storage (``available`` elements; default: the
    storage's own count)."""
    offset = int_(offset, "a tensor's storage offset")
    size = ints_(size, "a tensor's size")
    stride = ints_(stride, "a tensor's stride")
    if len(size) != len(stride):
        raise Refusal("a tensor's size and stride differ in length", corrupt=True)
    if math.prod(size) == 0:
        return
    last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    if available is None:
        available = int(storage._size())  # type: ignore[no-untyped-call]
    if last >= available:
        raise Refusal(
            f"a tensor view reaches element {last} of a storage of {available} elements",
            corrupt=True,
        )


def _flags(requires_grad: Any, hooks: Any, metadata: Any) -> None:
    """The arguments after a tensor view: a boolean, no hooks, an optional dict of flags."""
    if type(requires_grad) is not bool:
        raise Refusal("requires_grad is not a boolean")
    no_hooks(hooks)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(type(k) is str and type(v) is bool for k, v in metadata.items())
    ):
        raise Refusal("a tensor's metadata is not a dict of flags")


def rebuild_tensor_v2(rules: SafeRules, args: tuple[Any, ...]) -> torch.Tensor:
    args_(args, 6, 7, "rebuild_tensor_v2")
    storage = storage_(rules, args[0])
    check_view(storage, args[1], args[2], args[3])
    metadata = args[6] if len(args) == 7 else None
    _flags(args[4], args[5], metadata)
    return torch._utils._rebuild_tensor_v2(  # type: ignore[no-untyped-call,no-any-return]
        storage,
        args[1],
        tuple(args[2]),
        tuple(args[3]),
        args[4],
        collections.OrderedDict(),
        metadata,
    )


def rebuild_tensor_v3(rules: SafeRules, args: tuple[Any, ...]) -> torch.Tensor:
    """A tensor of a dtype without a typed storage class (float8, float4, uint16, ...): its
    storage is bytes, its view counted in elements of ``dtype``."""
    args_(args, 7, 8, "rebuild_tensor_v3")
    storage = storage_(rules, args[0])
    dtype = args[6]
    if not isinstance(dtype, torch.dtype) or dtype in QUANTIZED_DTYPES or dtype.itemsize < 1:
        raise Refusal(f"a tensor's dtype is {dtype!r}")
    available = storage._nbytes() // dtype.itemsize  # type: ignore[no-untyped-call]
    check_view(storage, args[1], args[2], args[3], available)
    metadata = args[7] if len(args) == 8 else None
    _flags(args[4], args[5], metadata)
    return torch._utils._rebuild_tensor_v3(  # type: ignore[no-untyped-call,no-any-return]
        storage,
        args[1],
        tuple(args[2]),
        tuple(args[3]),
        args[4],
        collections.OrderedDict(),
        dtype,
        metadata,
    )


def rebuild_tensor(rules: SafeRules, args: tuple[Any, ...]) -> torch.Tensor:
    args_(args, 4, 4, "rebuild_tensor")
    storage = storage_(rules, args[0])
    check_view(storage, args[1], args[2], args[3])
    return torch._utils._rebuild_tensor(  # type: ignore[no-untyped-call,no-any-return]
        storage, args[1], tuple(args[2]), tuple(args[3])
    )


PACKED = {
    getattr(torch, name): count
    for name, count in (("quint4x2", 2), ("quint2x4", 4))
    if hasattr(torch, name)
}


def rebuild_qtensor(rules: SafeRules, args: tuple[Any, ...]) -> torch.Tensor:
    args_(args, 7, 7, "rebuild_qtensor")
    storage = storage_(rules, args[0])
    # quint4x2 and quint2x4 pack two and four values into each byte of their storage.
    packed = PACKED.get(storage.dtype, 1)
    check_view(storage, args[1], args[2], args[3], int(storage._size()) * packed)  # type: ignore[no-untyped-call]
    params = args[4]
    if not isinstance(params, tuple) or not params:
        raise Refusal("quantizer parameters are not a tuple")
    scheme = params[0]
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        if len(params) != 3 or type(params[1]) is not float or type(params[2]) is not int:
            raise Refusal("per-tensor quantizer parameters are not (scheme, scale, zero point)")
        if storage._untyped_storage.device.type != "meta":
            _built(lambda: check_tensor_qparams(storage.dtype, params[1], params[2]))
    elif scheme in (
        torch.per_channel_affine,
        torch.per_channel_symmetric,
        torch.per_channel_affine_float_qparams,
    ):
        if len(params) != 4 or not all(type(p) is torch.Tensor for p in params[1:3]):
            raise Refusal("per-channel quantizer parameters are not (scheme, scales, zeros, axis)")
        size = tuple(args[2])
        axis = int_(params[3], "a quantization axis", high=max(len(size) - 1, 0))
        if size and not params[1].numel() == params[2].numel() == size[axis]:
            raise Refusal("per-channel scales do not match the tensor", corrupt=True)
        if storage._untyped_storage.device.type != "meta":
            _built(lambda: check_channel_qparams(storage.dtype, scheme, params[1], params[2]))
    else:
        raise Refusal(f"unknown quantization scheme {scheme!r}")
    if type(args[5]) is not bool:
        raise Refusal("requires_grad is not a boolean")
    no_hooks(args[6])
    if storage._untyped_storage.device.type == "meta":
        # Quantizers have no meta kernels; read without data, the dtype and shape are all.
        size = tuple(args[2])
        return stand_in(size, storage.dtype, math.prod(size) * storage.dtype.itemsize)
    return torch._utils._rebuild_qtensor(  # type: ignore[no-untyped-call,no-any-return]
        storage,
        args[1],
        tuple(args[2]),
        tuple(args[3]),
        params,
        args[5],
        collections.OrderedDict(),
    )


def tensor_(value: Any) -> torch.Tensor:
    if type(value) is not torch.Tensor:
        raise Refusal(f"a parameter wraps a {type(value).__name__}, not a tensor")
    return value


def rebuild_parameter(rules: SafeRules, args: tuple[Any, ...]) -> torch.nn.Parameter:
    args_(args, 3, 3, "rebuild_parameter")
    if type(args[1]) is not bool:
        raise Refusal("requires_grad is not a boolean")
    no_hooks(args[2])
    return torch.nn.Parameter(tensor_(args[0]), args[1])


def set_state(obj: Any, state: Any) -> None:
    for key, value in plain_state(state).items():
        setattr(obj, key, value)


def rebuild_parameter_with_state(rules: SafeRules, args: tuple[Any, ...]) -> torch.nn.Parameter:
    args_(args, 4, 4, "rebuild_parameter_with_state")
    param = rebuild_parameter(rules, args[:3])
    set_state(param, args[3])
    return param


def rebuild_from_type_v2(rules: SafeRules, args: tuple[Any, ...]) -> torch.Tensor:
    args_(args, 4, 4, "rebuild_from_type_v2")
    func, new_type, inner, state = args
    checker = rules.checker(func)
    if checker is jagged_refused:
        jagged_refused(rules, inner)
    if checker is None or not isinstance(inner, tuple):
        raise Refusal("rebuilds a tensor subclass through a function torchkeep does not check")
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise Refusal(f"rebuilds a tensor as {new_type!r}, which torchkeep does not allow")
    result = checker(rules, inner)
    if not isinstance(result, torch.Tensor):
        raise Refusal("a tensor rebuild did not give a tensor")
    if type(result) is not new_type:
        result = result.as_subclass(new_type)
    set_state(result, state)
    return result  # type: ignore[no-any-return]


def _built(build: Callable[[], _T]) -> _T:
    """``build()``, a file's impossible facts (``ValueError``) becoming a corrupt refusal."""
    try:
        return build()
    except ValueError as exc:
        raise Refusal(str(exc), corrupt=True) from exc


def rebuild_sparse_tensor(rules: SafeRules, args: tuple[Any, ...]) -> torch.Tensor:
    """A sparse tensor, its invariants checked as it is built (see ``sparse_from_parts``)."""
    args_(args, 2, 2, "rebuild_sparse_tensor")
    layout, data = args
    if layout not in SPARSE_LAYOUTS or not isinstance(data, tuple):
        raise Refusal(f"a sparse tensor has layout {layout!r}")
    if layout == torch.sparse_coo:
        args_(data, 3, 4, "a sparse COO tensor")
        coalesced = data[3] if len(data) == 4 else None
        return _built(lambda: sparse_from_parts(layout, data[:2], tuple(data[2]), coalesced))
    args_(data, 4, 4, "a sparse compressed tensor")
    return _built(lambda: sparse_from_parts(layout, data[:3], tuple(data[3])))


def rebuild_nested_tensor(rules: SafeRules, args: tuple[Any, ...]) -> torch.Tensor:
    """A nested tensor (strided layout), every view checked to lie inside its buffer."""
    args_(args, 4, 4, "rebuild_nested_tensor")
    return _built(lambda: nested_from_buffer(*args))


def jagged_refused(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    raise Refusal(
        "holds a nested tensor with the jagged layout, which torchkeep reads only with "
        "trust=True (torch.load(weights_only=True) refuses it too unless torch._dynamo is "
        "imported). Checkpoint folders (torchkeep.save_checkpoint) store jagged tensors without "
        "pickle; for .pt files convert it first: torch.nested.nested_tensor(list(t.unbind()))",
        plain=True,
    )


def jagged_table() -> dict[str, tuple[Any, Checker | None]]:
    """The names a jagged nested tensor's pickle uses, each refused with ``jagged_refused``.

    Listed so the refusal says what the file holds instead of naming torch._dynamo's range
    class as dangerous; the range objects it builds first are inert stand-ins.
    """
    module = "torch.nested._internal.nested_tensor"
    return {
        f"{module}._rebuild_njt": (f"{module}._rebuild_njt", jagged_refused),
        f"{module}.NestedTensor": (f"{module}.NestedTensor", None),
        "torch._dynamo.decorators._DimRange": (
            stub_class("torch._dynamo.decorators._DimRange"),
            None,
        ),
    }


def no_data(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    raise Refusal(
        "holds a tensor without data (a meta tensor), which cannot be loaded as weights",
        corrupt=True,
    )


def unsupported_tensor(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    raise Refusal(
        "holds a wrapper-subclass, MKL-DNN or device-specific tensor, which torchkeep reads "
        "only with trust=True"
    )


# plain values


def ordered_dict(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 0, 1, "OrderedDict")
    value: collections.OrderedDict[Any, Any] = collections.OrderedDict()
    for pair in args[0] if args else ():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise Refusal("OrderedDict items are not pairs")
        value[pair[0]] = pair[1]
    return value


def counter(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 0, 1, "Counter")
    if args and not isinstance(args[0], dict):
        raise Refusal("Counter is built from something other than a dict")
    return collections.Counter(args[0] if args else {})


def defaultdict(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 0, 2, "defaultdict")
    factory = args[0] if args else None
    if not any(factory is f for f in FACTORIES):
        raise Refusal(f"a defaultdict's default factory is {factory!r}")
    value: collections.defaultdict[Any, Any] = collections.defaultdict(factory)
    if len(args) == 2:
        if not isinstance(args[1], dict):
            raise Refusal("defaultdict items are not a dict")
        value.update(args[1])
    return value


def deque(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 0, 2, "deque")
    items = args[0] if args else ()
    if not isinstance(items, (list, tuple)):
        raise Refusal("a deque is built from something other than a list")
    maxlen = args[1] if len(args) == 2 else None
    if maxlen is not None:
        int_(maxlen, "a deque's maxlen")
    return collections.deque(items, maxlen)


def hashable_items(args: tuple[Any, ...], what: str) -> list[Any]:
    args_(args, 0, 1, what)
    items = args[0] if args else ()
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise Refusal(f"a {what} is built from something other than a list")
    return list(items)


def set_(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    return set(hashable_items(args, "set"))


def frozenset_(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    return frozenset(hashable_items(args, "frozenset"))


LATIN1 = ("latin1", "latin-1", "utf-8", "utf8", "ascii")


def bytes_from(args: tuple[Any, ...], what: str) -> bytes:
    args_(args, 0, 2, what)
    if not args:
        return b""
    data = args[0]
    if isinstance(data, (bytes, bytearray)) and len(args) == 1:
        return bytes(data)
    if isinstance(data, str) and len(args) == 2 and args[1] in LATIN1:
        return data.encode(args[1])
    raise Refusal(f"{what} is built from {type(data).__name__} (only bytes or text are read)")


def bytearray_(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    return bytearray(bytes_from(args, "bytearray"))


def bytes_(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    return bytes_from(args, "bytes")


def encode(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 1, 2, "_codecs.encode")
    if len(args) == 1 and isinstance(args[0], str):
        return args[0].encode("utf-8")
    return bytes_from(args, "_codecs.encode")


def complex_(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 0, 2, "complex")
    if not all(type(a) in (int, float) for a in args):
        raise Refusal("complex is built from something other than numbers")
    return complex(*args)


def slice_or_range(kind: type) -> Checker:
    def check(rules: SafeRules, args: tuple[Any, ...]) -> Any:
        args_(args, 1, 3, kind.__name__)
        if not all(a is None or type(a) is int for a in args):
            raise Refusal(f"{kind.__name__} is built from something other than integers")
        if kind is range and None in args:
            raise Refusal("range is built from None")
        return kind(*args)

    return check


def reconstructor(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 3, 3, "copyreg._reconstructor")
    cls, base, state = args
    if isinstance(cls, type) and issubclass(cls, StubObject):
        obj = cls()
        if state is not None:
            obj.__dict__["_stub_state"] = state
        return obj
    if cls in (argparse.Namespace, types.SimpleNamespace) and base is object and state is None:
        return cls.__new__(cls)  # type: ignore[call-overload]
    if cls is torch.torch_version.TorchVersion and base is str:
        return torch_version(rules, (state,))  # protocols 0 and 1
    raise Refusal(f"copyreg._reconstructor builds {cls!r}")


def namespace(kind: type) -> Checker:
    def check(rules: SafeRules, args: tuple[Any, ...]) -> Any:
        args_(args, 0, 1, kind.__name__)
        obj = kind.__new__(kind)  # type: ignore[call-overload]
        if args:
            vars(obj).update(plain_state(args[0]))
        return obj

    return check


DATETIME_BYTES = {datetime.datetime: 10, datetime.date: 4, datetime.time: 6}


def datetime_value(kind: type) -> Checker:
    def check(rules: SafeRules, args: tuple[Any, ...]) -> Any:
        args_(args, 1, 2, kind.__name__)
        if not isinstance(args[0], bytes) or len(args[0]) != DATETIME_BYTES[kind]:
            raise Refusal(f"a {kind.__name__} is not built from its packed bytes")
        if len(args) == 2 and not isinstance(args[1], datetime.tzinfo):
            raise Refusal(f"a {kind.__name__}'s time zone is not a time zone")
        return kind(*args)

    return check


def timedelta_value(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 0, 3, "timedelta")
    if not all(type(a) is int and abs(a) < 1 << 40 for a in args):
        raise Refusal("a timedelta is built from something other than integers")
    return datetime.timedelta(*args)


def timezone_value(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 1, 2, "timezone")
    if not isinstance(args[0], datetime.timedelta) or (len(args) == 2 and type(args[1]) is not str):
        raise Refusal("a timezone is not built from an offset and a name")
    return datetime.timezone(*args)


def path_(kind: type) -> Checker:
    def check(rules: SafeRules, args: tuple[Any, ...]) -> Any:
        if not all(type(a) is str for a in args):
            raise Refusal("a path is built from something other than text")
        return kind(*args)

    return check


def size_(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 0, 1, "torch.Size")
    return torch.Size(ints_(args[0], "a torch.Size") if args else ())


def device_(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 1, 2, "torch.device")
    if type(args[0]) is not str or not DEVICE.fullmatch(args[0]):
        raise Refusal(f"a device is named {args[0]!r}")
    if len(args) == 2:
        int_(args[1], "a device index", high=1 << 16)
    try:
        return torch.device(*args)
    except RuntimeError as exc:
        raise Refusal(f"unknown device {args!r}", corrupt=True) from exc


LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def get_layout(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 1, 1, "get_layout")
    if args[0] not in LAYOUTS:
        raise Refusal(f"unknown tensor layout {args[0]!r}")
    return LAYOUTS[args[0]]


def list_of(kinds: tuple[type, ...], what: str) -> Checker:
    def check(rules: SafeRules, args: tuple[Any, ...]) -> Any:
        args_(args, 1, 1, what)
        if not isinstance(args[0], list) or not all(type(v) in kinds for v in args[0]):
            raise Refusal(f"{what} is given something other than a list of {kinds[0].__name__}")
        return args[0]

    return check


def restore_type_tag(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    args_(args, 2, 2, "restore_type_tag")
    if type(args[1]) is not str:
        raise Refusal("a type tag is not text")
    return args[0]


def torch_version(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    """``torch.__version__`` as pickled: a ``str`` subclass built from its text, nothing else."""
    args_(args, 1, 1, "TorchVersion")
    if type(args[0]) is not str or len(args[0]) > 256:
        raise Refusal("a TorchVersion is built from something other than a short text")
    return torch.torch_version.TorchVersion(args[0])


def subscript(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    """``operator.getitem`` as typing aliases pickle (``Union[int, str]``), on stand-ins only.

    Nothing is subscripted: a stand-in for a class (``typing.Union``, a config class) gives
    another stand-in that holds the subscript as data, as calling a stand-in does.
    """
    args_(args, 2, 2, "operator.getitem")
    base = args[0]
    stand_in = isinstance(base, StubObject) or (
        isinstance(base, type) and issubclass(base, StubObject)
    )
    if not stand_in:
        raise Refusal(f"operator.getitem is applied to a {type(base).__name__}")
    return derived_stub(base.stub_qualname, "[]")(args[1])


# numpy


def np_reconstruct(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    import numpy as np

    args_(args, 3, 3, "numpy _reconstruct")
    if args[0] is not np.ndarray or args[1] != (0,) or args[2] not in (b"b", "b"):
        raise Refusal("numpy _reconstruct is asked for something other than an empty array")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def np_dtype_of(value: Any) -> Any:
    import numpy as np

    if not isinstance(value, np.dtype) or value.hasobject or value.fields or value.subdtype:
        raise Refusal("a numpy dtype holds Python objects or fields")
    return value


NP_DTYPE = re.compile(r"[<>|=]?[biufcmMSU?][0-9]{0,3}(\[[a-zA-Z]{1,3}\])?")


def np_dtype(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    import numpy as np

    args_(args, 1, 3, "numpy.dtype")
    if type(args[0]) is not str or not NP_DTYPE.fullmatch(args[0]):
        raise Refusal(f"a numpy dtype is named {args[0]!r}")
    # A fresh copy: builtin dtypes are shared singletons, and BUILD sets state on the result.
    return np_dtype_of(np.dtype(args[0], False, True))


def np_scalar(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    import numpy as np

    args_(args, 2, 2, "numpy scalar")
    dtype = np_dtype_of(args[0])
    if not isinstance(args[1], bytes) or len(args[1]) != dtype.itemsize:
        raise Refusal("a numpy scalar's bytes do not match its dtype")
    return np.frombuffer(args[1], dtype=dtype)[0].copy()


def np_frombuffer(rules: SafeRules, args: tuple[Any, ...]) -> Any:
    import numpy as np

    args_(args, 4, 4, "numpy _frombuffer")
    data, dtype, shape, order = args
    dtype = np_dtype_of(dtype)
    shape = ints_(shape, "a numpy array's shape")
    if not isinstance(data, (bytes, bytearray)) or order not in ("C", "F"):
        raise Refusal("a numpy array's data is not raw bytes")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise Refusal("a numpy array's data does not match its shape", corrupt=True)
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order).copy(order=order)


def build_ndarray(obj: Any, state: Any) -> None:
    if not isinstance(state, tuple) or len(state) != 5:
        raise Refusal("a numpy array's state is not (version, shape, dtype, order, data)")
    _, shape, dtype, fortran, data = state
    shape = ints_(shape, "a numpy array's shape")
    dtype = np_dtype_of(dtype)
    if type(fortran) is not bool or not isinstance(data, (bytes, bytearray)):
        raise Refusal("a numpy array's data is not raw bytes")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise Refusal("a numpy array's data does not match its shape", corrupt=True)
    obj.__setstate__((1, shape, dtype, fortran, bytes(data)))


def build_np_dtype(obj: Any, state: Any) -> None:
    if (
        not isinstance(state, tuple)
        or len(state) not in (8, 9)
        or state[1] not in ("<", ">", "|", "=")
        or any(part is not None for part in state[2:5])
        or not all(type(v) is int for v in state[5:])
        or type(state[0]) is not int
    ):
        raise Refusal("a numpy dtype's state is not a plain scalar dtype's")
    obj.__setstate__(state)
