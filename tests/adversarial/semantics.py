"""Pickles that use only allowlisted names, but ask them to do what a weights file never needs:
change a class, call a constructor with unchecked arguments, build a tensor outside its storage.
torch.load(weights_only=True) refuses each of these at the opcode level.
"""

from __future__ import annotations

import pickle
import struct

from .containers import storage_ref
from .opcodes import Asm, finish

# The bytes of the one storage record these files carry: four float32 values 0, 1, 2, 3.
FLOATS = struct.pack("<4f", 0.0, 1.0, 2.0, 3.0)


def _class_setattr(
    module: str, name: str, attrs: list[tuple[str, tuple[str, str] | object]]
) -> Asm:
    """GLOBAL cls; BUILD (None, {attr: value}): pickle's slot-state path calls setattr(cls, ...)."""
    asm = Asm(2).global_(module, name).mark().none().raw(pickle.EMPTY_DICT)
    for attr, value in attrs:
        asm.str(attr)
        if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
            asm.global_(*value)
        else:
            asm.value(value)
        asm.raw(pickle.SETITEM)
    return asm.raw(pickle.TUPLE).build()


def build_namespace_dump_patches(marker: str) -> bytes:
    """The legacy container-source check: Namespace.dump_patches=True, __name__ = a path.

    In a legacy file, a ('module', cls, file, source) persistent id then makes torch write
    ``<__name__>.patch``.
    """
    asm = _class_setattr("argparse", "Namespace", [("dump_patches", True), ("__name__", marker)])
    asm.put(0).pop()
    asm.mark().str("module").get(0).str("argparse.py").str("class Namespace: pass\n")
    asm.raw(pickle.TUPLE).binpersid()
    return finish(asm)


def build_counter_missing(marker: str) -> bytes:
    return finish(_class_setattr("collections", "Counter", [("__missing__", ("builtins", "set"))]))


def build_namespace_eq(marker: str) -> bytes:
    return finish(_class_setattr("argparse", "Namespace", [("__eq__", ("builtins", "set"))]))


def build_simplenamespace(marker: str) -> bytes:
    return finish(_class_setattr("types", "SimpleNamespace", [("__repr__", ("builtins", "str"))]))


def build_ordereddict(marker: str) -> bytes:
    return finish(_class_setattr("collections", "OrderedDict", [("popitem", ("builtins", "set"))]))


def build_tensor_class(marker: str) -> bytes:
    return finish(_class_setattr("torch", "Tensor", [("__len__", ("builtins", "set"))]))


def build_parameter_class(marker: str) -> bytes:
    return finish(
        _class_setattr("torch.nn.parameter", "Parameter", [("__deepcopy__", ("builtins", "set"))])
    )


def build_function_dict(marker: str) -> bytes:
    asm = Asm(2).global_("torch._utils", "_rebuild_tensor_v2").value({"hijacked": True}).build()
    return finish(asm)


def build_function_defaults(marker: str) -> bytes:
    return finish(_class_setattr("torch._utils", "_rebuild_tensor_v2", [("__defaults__", (7,))]))


def build_module(marker: str) -> bytes:
    return finish(_class_setattr("torch", "_utils", [("_rebuild_tensor_v2", ("builtins", "set"))]))


def newobj_ex_tensor_cdata(marker: str) -> bytes:
    asm = Asm(4).global_("torch", "Tensor").tuple().value({"cdata": 0x7F00DEADBEEF}).newobj_ex()
    return finish(asm)


def newobj_ex_storage_allocator(marker: str) -> bytes:
    asm = Asm(4).global_("torch.storage", "UntypedStorage").tuple(16)
    asm.value({"allocator": 0x7F00DEADBEEF}).newobj_ex()
    return finish(asm)


def newobj_tensor_size(marker: str) -> bytes:
    asm = Asm(2).global_("torch", "Tensor").tuple(512, 512).newobj()
    return finish(asm)


def reduce_tensor_uninitialised(marker: str) -> bytes:
    return finish(
        Asm(2)
        .raw(pickle.EMPTY_DICT)
        .str("weight")
        .call("torch", "Tensor", 256, 256)
        .raw(pickle.SETITEM)
    )


def reduce_storage_uninitialised(marker: str) -> bytes:
    return finish(Asm(2).call("torch.storage", "UntypedStorage", 1 << 20))


def _rebuild(
    size: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int = 0,
    hooks: Asm | None = None,
    numel: int = 4,
) -> Asm:
    asm = Asm(proto=None).global_("torch._utils", "_rebuild_tensor_v2").mark()
    asm.raw(storage_ref("0", "FloatStorage", numel))
    asm.int(offset).value(size).value(stride).bool(False)
    if hooks is None:
        asm.global_("collections", "OrderedDict").tuple().reduce()
    else:
        asm.raw(hooks.bytes())
    return asm.raw(pickle.TUPLE).reduce()


def _state_dict(value: Asm, proto: int = 2) -> bytes:
    asm = Asm(proto).raw(pickle.EMPTY_DICT).str("weight").raw(value.bytes()).raw(pickle.SETITEM)
    return finish(asm)


def rebuild_size_beyond_storage(marker: str) -> bytes:
    return _state_dict(_rebuild((1000,), (1,)))


def rebuild_offset_beyond_storage(marker: str) -> bytes:
    return _state_dict(_rebuild((2,), (1,), offset=1 << 40))


def rebuild_huge_stride(marker: str) -> bytes:
    return _state_dict(_rebuild((2,), (1 << 40,)))


def rebuild_negative_stride(marker: str) -> bytes:
    return _state_dict(_rebuild((2,), (-1,), offset=3))


def rebuild_negative_size(marker: str) -> bytes:
    return _state_dict(_rebuild((-4,), (1,)))


def rebuild_overflowing_size(marker: str) -> bytes:
    return _state_dict(_rebuild((1 << 62, 1 << 62), (1, 1)))


def rebuild_backward_hooks(marker: str) -> bytes:
    hooks = Asm(proto=None).global_("collections", "OrderedDict").tuple().reduce()
    hooks.int(0).global_("collections", "Counter").raw(pickle.SETITEM)
    return _state_dict(_rebuild((4,), (1,), hooks=hooks))


def rebuild_meta_tensor(marker: str) -> bytes:
    asm = Asm(proto=None).global_("torch._utils", "_rebuild_meta_tensor_no_storage").mark()
    asm.global_("torch", "float32").value((4,)).value((1,)).bool(False).raw(pickle.TUPLE)
    return _state_dict(asm.reduce())


def parameter_with_dunder_state(marker: str) -> bytes:
    asm = Asm(proto=None).global_("torch._utils", "_rebuild_parameter_with_state").mark()
    asm.raw(_rebuild((4,), (1,)).bytes()).bool(True)
    asm.global_("collections", "OrderedDict").tuple().reduce()
    asm.raw(pickle.EMPTY_DICT).str("__reduce_ex__").global_("builtins", "set").raw(pickle.SETITEM)
    asm.raw(pickle.TUPLE).reduce()
    return _state_dict(asm)


def setitem_on_tensor(marker: str) -> bytes:
    asm = Asm(2).raw(pickle.EMPTY_DICT).str("weight")
    asm.raw(_rebuild((4,), (1,)).bytes()).put(1).int(0).float(1e30).raw(pickle.SETITEM)
    asm.raw(pickle.SETITEM)
    return finish(asm)


def setitems_on_class(marker: str) -> bytes:
    asm = Asm(2).global_("collections", "Counter").mark().str("a").int(1).raw(pickle.SETITEMS)
    return finish(asm)


def append_on_namespace(marker: str) -> bytes:
    asm = Asm(2).call("argparse", "Namespace").int(1).raw(pickle.APPEND)
    return finish(asm)


def appends_on_bytearray(marker: str) -> bytes:
    asm = Asm(2).call("builtins", "bytearray").mark().int(1).int(2).raw(pickle.APPENDS)
    return finish(asm)


def setitem_on_size(marker: str) -> bytes:
    asm = Asm(2).call("torch", "Size", (1, 2)).int(0).int(5).raw(pickle.SETITEM)
    return finish(asm)


SEMANTICS = {
    name: fn
    for name, fn in dict(globals()).items()
    if callable(fn) and name[0] != "_" and name not in {"finish", "storage_ref", "Asm"}
}
