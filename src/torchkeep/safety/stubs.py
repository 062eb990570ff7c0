"""Inert stand-ins for classes a pickle names but that are never imported.

A whole-model pickle (``torch.save(model)``) names the model's classes. Importing them would
run their modules' code, and they may not even exist any more. Instead each unknown class
becomes a stub class: unpickling creates stub instances and fills their ``__dict__`` with the
pickled state, and nothing of the original class runs. A stub whose state holds
``_parameters``, ``_buffers`` and ``_modules`` is the module tree, and its tensors are read
from there under the names ``model.state_dict()`` would give.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch

from torchkeep._facts import ModuleEntry
from torchkeep.errors import CorruptFileError, UnsafeFileError

STUB_MODULE = "torchkeep.stubs"


class StubObject:
    """An instance of a class that was not imported; it only holds the pickled state."""

    stub_qualname: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StubObject:
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        # Objects with __slots__ pickle (dict state, slot state); plain ones a dict.
        if (
            isinstance(state, tuple)
            and len(state) == 2
            and all(part is None or isinstance(part, dict) for part in state)
        ):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stub_state"] = state

    # Pickles of list and dict subclasses append items after creating the object.
    def append(self, item: Any) -> None:
        self.__dict__.setdefault("_stub_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("_stub_items", []).extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_stub_mapping", {})[key] = value

    def __repr__(self) -> str:
        return f"<stub of {self.stub_qualname}>"


_STUB_CLASSES: dict[str, type[StubObject]] = {}


def stub_class(qualname: str) -> type[StubObject]:
    """The (cached) stub class standing in for ``qualname``."""
    if qualname not in _STUB_CLASSES:
        name = qualname.rpartition(".")[2] or qualname
        _STUB_CLASSES[qualname] = type(
            name, (StubObject,), {"__module__": STUB_MODULE, "stub_qualname": qualname}
        )
    return _STUB_CLASSES[qualname]


def derived_stub(qualname: str, suffix: str) -> type[StubObject]:
    """The stub class for what calling (``"()"``) or subscripting (``"[]"``) a stub gives.

    One suffix at most, so a pickle that calls a result again and again does not make
    ever longer names.
    """
    return stub_class(re.split(r"[(\[]", qualname, maxsplit=1)[0] + suffix)


def class_name(obj: Any) -> str:
    """The fully qualified class name of a real object or of the class a stub stands for."""
    if isinstance(obj, StubObject):
        return obj.stub_qualname
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def is_module_like(obj: Any) -> bool:
    """True for real modules and for stubs holding a module's state."""
    if isinstance(obj, torch.nn.Module):
        return True
    if not isinstance(obj, StubObject):
        return False
    state = obj.__dict__
    return all(isinstance(state.get(k), dict) for k in ("_parameters", "_buffers", "_modules"))


# A module tree read from a file may share one child under many names at every level, so that
# a small file names exponentially many tensors; past this many names it is refused.
MAX_TREE_NAMES = 1_000_000


class _Walk:
    """One bounded walk over a (stub or real) module tree: a name budget and the open path."""

    def __init__(self) -> None:
        self.left = MAX_TREE_NAMES
        self.open: set[int] = set()

    def take(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise UnsafeFileError(
                f"the module tree in this file expands to more than {MAX_TREE_NAMES:,} names "
                "(the same modules registered under many names); refusing to walk it"
            )

    def enter(self, obj: Any) -> None:
        if id(obj) in self.open:
            raise CorruptFileError("the module tree in this file contains itself")
        self.open.add(id(obj))


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The flat tensors of a (stub or real) module tree, named as ``state_dict()`` names them.

    Parameters and persistent buffers are included, ``None`` entries and non-persistent
    buffers are not, in the order modules register them.

    Raises:
        UnsafeFileError: the tree names more than ``MAX_TREE_NAMES`` tensors.
        CorruptFileError: the tree contains itself.
    """
    out: dict[str, torch.Tensor] = {}
    _state_dict(obj, prefix, out, _Walk())
    return out


def _state_dict(obj: Any, prefix: str, out: dict[str, torch.Tensor], walk: _Walk) -> None:
    if isinstance(obj, torch.nn.Module):
        state = obj.state_dict()
        walk.take(len(state))
        out.update((prefix + k, v) for k, v in state.items())
        return
    walk.enter(obj)
    state = obj.__dict__
    for name, value in state["_parameters"].items():
        if isinstance(value, torch.Tensor):
            walk.take(1)
            out[prefix + name] = value
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in state["_buffers"].items():
        if isinstance(value, torch.Tensor) and name not in skip:
            walk.take(1)
            out[prefix + name] = value
    for name, child in state["_modules"].items():
        if child is not None and is_module_like(child):
            _state_dict(child, f"{prefix}{name}.", out, walk)
    walk.open.discard(id(obj))


def module_tree(obj: Any) -> list[ModuleEntry]:
    """Every module under ``obj`` in registration order, with parameter counts.

    Raises:
        UnsafeFileError: the tree has more than ``MAX_TREE_NAMES`` modules and tensors.
        CorruptFileError: the tree contains itself.
    """
    entries: list[ModuleEntry] = []
    walk = _Walk()

    # Real modules keep the same three dicts in their __dict__ as the stubs do.
    def visit(module: Any, name: str, depth: int) -> int:
        walk.take(1)
        walk.enter(module)
        entry = len(entries)
        entries.append(ModuleEntry(name, class_name(module), 0, depth))
        total = sum(t.numel() for t in _own_tensors(module))
        for child_name, child in module.__dict__["_modules"].items():
            if child is not None and is_module_like(child):
                total += visit(child, f"{name}.{child_name}" if name else child_name, depth + 1)
        walk.open.discard(id(module))
        entries[entry] = ModuleEntry(name, class_name(module), total, depth)
        return total

    visit(obj, "", 0)
    return entries


def _own_tensors(module: Any) -> list[torch.Tensor]:
    """A (stub or real) module's own parameters and persistent buffers, not its children's."""
    state = module.__dict__
    skip = state.get("_non_persistent_buffers_set") or set()
    params = [v for v in state["_parameters"].values() if isinstance(v, torch.Tensor)]
    buffers = [
        v for k, v in state["_buffers"].items() if isinstance(v, torch.Tensor) and k not in skip
    ]
    return params + buffers


def find_stubs(obj: Any, limit: int = 10_000) -> list[str]:
    """Qualified names of the stub classes used anywhere in ``obj`` (bounded walk)."""
    seen: set[int] = set()
    found: dict[str, None] = {}
    stack = [obj]
    while stack and len(seen) < limit:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, StubObject):
            found[item.stub_qualname] = None
            stack.extend(item.__dict__.values())
        elif isinstance(item, torch.nn.Module):
            # A real wrapper (DataParallel, Sequential) may hold stubs among its children.
            stack.extend(vars(item).values())
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, type) and issubclass(item, StubObject):
            found[item.stub_qualname] = None
    return list(found)
