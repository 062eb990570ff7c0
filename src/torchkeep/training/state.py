"""Training state: what to save for each kind of object, how to put it back, and RNG states.

A checkpoint entry is one keyword of ``save_checkpoint``. Its *kind* decides what is stored:

- ``module``: the unwrapped module's state dict under canonical names (no ``module.`` or
  ``_orig_mod.``), plus torch's per-submodule version metadata;
- ``optimizer``, ``scheduler``, ``stateful``: ``state_dict()`` (GradScaler, user classes, ...);
- ``generator``: a ``torch.Generator``'s ``get_state()``;
- ``numpy_generator``: a ``numpy.random.Generator``'s bit generator state;
- ``value``: anything else, stored as it is (see :mod:`torchkeep.formats.tree`).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from torchkeep._common import unwrap
from torchkeep.errors import (
    CorruptFileError,
    InvalidStateError,
    KeyMismatchError,
    TorchkeepWarning,
)
from torchkeep.formats.tree import map_tensors
from torchkeep.safety.stubs import find_stubs, is_module_like, module_state_dict
from torchkeep.weights.keys import plan_keys, strip_compile_segments
from torchkeep.weights.report import LoadReport, ShapeMismatch, refusal


def _is_stateful(value: object) -> bool:
    return (
        not isinstance(value, type)
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


def kind_of(value: object) -> str:
    """The kind of checkpoint entry ``value`` makes (see the module docstring)."""
    if isinstance(value, torch.nn.Module):
        return "module"
    if isinstance(value, torch.optim.Optimizer):
        return "optimizer"
    schedulers = torch.optim.lr_scheduler
    if isinstance(value, schedulers.LRScheduler | schedulers.ReduceLROnPlateau):
        return "scheduler"
    if isinstance(value, torch.Generator):
        return "generator"
    if isinstance(value, np.random.Generator):
        return "numpy_generator"
    if _is_stateful(value):
        return "stateful"
    return "value"


def type_name(value: object) -> str:
    """``torch.optim.adam.Adam``: recorded for people reading the manifest."""
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _canonical_prefix(prefix: str) -> str:
    return strip_compile_segments(prefix + ".").removesuffix(".") if prefix else prefix


def capture(value: object) -> tuple[str, Any, dict[str, Any] | None]:
    """``(kind, state to store, module version metadata or None)`` for one entry."""
    kind = kind_of(value)
    if kind == "module":
        assert isinstance(value, torch.nn.Module)
        raw = unwrap(value).state_dict()
        state = {strip_compile_segments(name): tensor for name, tensor in raw.items()}
        metadata = getattr(raw, "_metadata", None) or {}
        return kind, state, {_canonical_prefix(p): dict(v) for p, v in metadata.items()}
    if kind == "generator":
        assert isinstance(value, torch.Generator)
        return kind, value.get_state(), None
    if kind == "numpy_generator":
        assert isinstance(value, np.random.Generator)
        return kind, value.bit_generator.state, None
    if kind != "value":
        return kind, value.state_dict(), None  # type: ignore[attr-defined]
    if isinstance(value, DataLoader):
        raise InvalidStateError(
            "a DataLoader keeps no position to save; wrap it once where it is built, "
            "loader = torchkeep.ResumableLoader(DataLoader(...)), iterate the wrapper, and save "
            "that: a restore then continues mid-epoch with the same batches"
        )
    return kind, value, None


def module_state(state: Mapping[str, Any], metadata: Mapping[str, Any] | None) -> Any:
    """A state dict carrying torch's ``_metadata`` again, as ``load_state_dict`` expects."""
    out: OrderedDict[str, Any] = OrderedDict(state)
    if metadata:
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return out


def _module_plan(
    name: str, target: torch.nn.Module, saved: Any, strict: bool
) -> OrderedDict[str, Any]:
    """The saved state renamed to ``target``'s names, checked before anything is loaded."""
    if not isinstance(saved, Mapping):
        raise InvalidStateError(
            f"checkpoint entry {name!r} holds a {type(saved).__name__}, not a state dict, so "
            f"it cannot be loaded into the {type(target).__name__} passed as {name}="
        )
    dest = unwrap(target)
    own = dest.state_dict()
    plan = plan_keys(list(saved), list(own))
    mismatched = [
        ShapeMismatch(dst, src, tuple(saved[src].shape), tuple(own[dst].shape))
        for dst, src in plan.pairs.items()
        if isinstance(saved[src], torch.Tensor)
        and isinstance(own[dst], torch.Tensor)
        and saved[src].shape != own[dst].shape
    ]
    bad = {m.name for m in mismatched}
    if strict and (plan.missing or plan.unexpected or mismatched):
        report = LoadReport(
            path=name,
            format="checkpoint entry",
            entry=name,
            missing=plan.missing,
            unexpected=plan.unexpected,
            mismatched=tuple(mismatched),
            renamed=plan.renamed,
            prefixes=plan.prefixes,
        )
        raise refusal(
            report,
            f"cannot load checkpoint entry {name!r} into {type(dest).__name__}; nothing was "
            "loaded (shape mismatches and names in the table):",
            "Pass strict=False to load what fits.",
        )
    mapped: OrderedDict[str, Any] = OrderedDict(
        (dst, saved[src]) for dst, src in plan.pairs.items() if dst not in bad
    )
    saved_meta = getattr(saved, "_metadata", None)
    own_meta = getattr(own, "_metadata", None)
    if saved_meta is not None and own_meta is not None:
        mapped._metadata = OrderedDict(  # type: ignore[attr-defined]
            (p, saved_meta.get(_canonical_prefix(p), v)) for p, v in own_meta.items()
        )
    return mapped


def weights_of(saved: Any) -> Any:
    """A pickled module object (``{"model": Net()}``) as its state dict; anything else as is.

    Without trust the module is an inert stub, whose tensors are read from its pickled state
    under the names ``state_dict()`` would give.
    """
    if isinstance(saved, torch.nn.Module):
        return unwrap(saved).state_dict()
    if is_module_like(saved):
        return module_state_dict(saved)
    return saved


def _refuse_stubs(name: str, target: object, saved: Any) -> None:
    stubs = find_stubs(saved, limit=1 << 62)
    if stubs:
        shown = ", ".join(stubs[:5]) + (f" and {len(stubs) - 5} more" if len(stubs) > 5 else "")
        raise InvalidStateError(
            f"checkpoint entry {name!r} holds objects of classes that were not imported "
            f"({shown}); they were read as inert stand-ins, which cannot be loaded into the "
            f"{type(target).__name__} passed as {name}=. If you trust the file, pass "
            "trust=True so that the real classes are used."
        )


def check(name: str, target: object, saved: Any, strict: bool) -> Any:
    """Validate ``saved`` against ``target`` before anything is restored; return what to load.

    A module target also takes a pickled module (see :func:`weights_of`). Values holding
    stand-ins for classes that were not imported are refused for every target.
    """
    if isinstance(target, torch.nn.Module):
        saved = weights_of(saved)
        _refuse_stubs(name, target, saved)
        return _module_plan(name, target, saved, strict)
    _refuse_stubs(name, target, saved)
    if isinstance(target, torch.Tensor) and (
        not isinstance(saved, torch.Tensor) or saved.shape != target.shape
    ):
        what = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise InvalidStateError(
            f"checkpoint entry {name!r} ({what}) does not fit the tensor of shape "
            f"{tuple(target.shape)} passed as {name}="
        )
    if isinstance(target, torch.Generator) and not isinstance(saved, torch.Tensor):
        raise InvalidStateError(f"checkpoint entry {name!r} is not a generator state")
    return saved


def restore(name: str, target: object, saved: Any, strict: bool) -> tuple[bool, Any]:
    """Put ``saved`` (already passed through :func:`check`) into ``target``.

    Returns:
        ``(True, None)`` when ``target`` was restored in place, else ``(False, value)`` with
        the value to hand back (a dataclass or Namespace target shapes the value returned).
    """
    if isinstance(target, torch.nn.Module):
        unwrap(target).load_state_dict(saved, strict=strict)
        return True, None
    if isinstance(target, torch.Tensor):
        with torch.no_grad():
            target.copy_(saved)
        return True, None
    if isinstance(target, torch.Generator):
        target.set_state(saved.cpu())
        return True, None
    if isinstance(target, np.random.Generator):
        target.bit_generator.state = saved
        return True, None
    if _is_stateful(target):
        target.load_state_dict(saved)  # type: ignore[attr-defined]
        if isinstance(target, DataLoader):
            warnings.warn(
                f"{name}= is restored, but a new iterator of {type(target).__name__} draws "
                "from the global random generator that was just restored, so random numbers "
                "after the resume (dropout, augmentation) differ from the saved run's; wrap "
                "the loader, torchkeep.ResumableLoader(loader), for a bit-exact resume",
                TorchkeepWarning,
                stacklevel=4,
            )
        return True, None
    return False, shaped_like(target, saved)


def require_entries(entries: Iterable[str], targets: Mapping[str, object], where: str) -> None:
    """Refuse targets the checkpoint has no entry for, before anything is read or touched."""
    held = list(entries)
    missing = [name for name in targets if name not in held]
    if missing:
        raise KeyMismatchError(
            f"checkpoint {where!r} has no entry {', '.join(map(repr, missing))}; it holds: "
            + (", ".join(map(repr, held)) or "nothing"),
            None,
        )


Loader = Callable[[Any], object]


def restore_all(
    values: Mapping[str, Any],
    targets: Mapping[str, object],
    *,
    strict: bool,
    device: str | torch.device | None,
    where: str,
    rng_state: Any = None,
    loaders: Mapping[str, Loader] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint's decoded entries into ``targets``: the one restore loop.

    Every target is checked before any is touched, so a mismatch leaves all of them as they
    were. ``loaders`` restore some targets their own way (a distributed checkpoint's modules
    and optimizers through DCP's ``set_*_state_dict``, which check as they load). Entries not
    restored in place are returned, their tensors on ``device`` (None: the CPU). The RNG state,
    when given, is restored last.
    """
    loaders = loaders or {}
    require_entries(values, targets, where)
    checked = {
        name: check(name, target, values[name], strict)
        for name, target in targets.items()
        if name not in loaders
    }
    move = device is not None and torch.device(device).type != "cpu"
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in loaders:
            loaders[name](value)
            continue
        if name in targets:
            done, value = restore(name, targets[name], checked[name], strict)
            if done:
                continue
        out[name] = map_tensors(value, lambda t: t.to(device)) if move else value
    if rng_state:
        restore_rng(rng_state)
    return out


def shaped_like(template: object, value: Any) -> Any:
    """``value`` as the type of ``template`` when that is a Namespace or a dataclass."""
    if isinstance(value, argparse.Namespace):
        fields = vars(value)
    elif isinstance(value, Mapping):
        fields = dict(value)
    else:
        return value
    if isinstance(template, argparse.Namespace):
        return argparse.Namespace(**fields)
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        if not isinstance(value, Mapping) or dataclasses.is_dataclass(value):
            return value
        made = type(template)(
            **{
                f.name: fields[f.name]
                for f in dataclasses.fields(template)
                if f.init and f.name in fields
            }
        )
        for f in dataclasses.fields(template):
            if not f.init and f.name in fields:
                object.__setattr__(made, f.name, fields[f.name])
        return made
    return value


# ---------------------------------------------------------------- namespaces in .pt files

# A .pt checkpoint holds only what torch.load(weights_only=True) reads, so a Namespace is
# stored as the dict of its fields and its place in the state is recorded beside it; reading
# the checkpoint turns those dicts back into Namespaces, as the native format does.


def namespace_paths(value: Any, path: tuple[Any, ...] = ()) -> list[list[Any]]:
    """Where ``value`` holds ``argparse.Namespace`` objects: a list of key/index paths.

    The walk follows :func:`torchkeep.formats.tree.to_torch_plain` (dict keys, list and tuple
    positions, Namespace and dataclass fields), outer Namespaces before inner ones.
    """
    found: list[list[Any]] = []
    fields: Mapping[Any, Any] | None = None
    if isinstance(value, argparse.Namespace):
        found.append(list(path))
        fields = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(value, Mapping):
        fields = value
    elif isinstance(value, (list, tuple)):
        fields = dict(enumerate(value))
    for key, item in (fields or {}).items():
        found.extend(namespace_paths(item, (*path, key)))
    return found


def revive_namespaces(value: Any, paths: Any, where: str) -> Any:
    """``value`` with the dicts at ``paths`` (from :func:`namespace_paths`) as Namespaces.

    Raises:
        CorruptFileError: a path that does not lead to a dict of string keys.
    """
    if not paths:
        return value
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in paths):
        raise CorruptFileError(f"{where!r} has a damaged record of its namespaces")
    # Inner ones first, so an outer Namespace is built around finished values.
    for path in sorted(paths, key=len, reverse=True):
        value = _revive(value, list(path), where)
    return value


def _revive(value: Any, path: list[Any], where: str) -> Any:
    if not path:
        if not isinstance(value, Mapping) or not all(type(k) is str for k in value):
            raise CorruptFileError(
                f"{where!r} records a namespace at a {type(value).__name__}, not a dict of fields"
            )
        return argparse.Namespace(**value)
    key, rest = path[0], path[1:]
    if isinstance(value, argparse.Namespace) and type(key) is str and hasattr(value, key):
        setattr(value, key, _revive(getattr(value, key), rest, where))
        return value
    if isinstance(value, dict) and _has_key(value, key):
        value[key] = _revive(value[key], rest, where)
        return value
    if isinstance(value, (list, tuple)) and type(key) is int and 0 <= key < len(value):
        items = list(value)
        items[key] = _revive(items[key], rest, where)
        return items if isinstance(value, list) else tuple(items)
    raise CorruptFileError(f"{where!r} records a namespace at a path its state does not have")


def _has_key(mapping: Mapping[Any, Any], key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:  # an unhashable key read from a damaged record
        return False


# ----------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """The global RNG states of Python, numpy, torch CPU and every CUDA device.

    Large integer arrays are stored as int64 tensors so the manifest stays small and a
    ``.pt`` file still loads with ``torch.load(weights_only=True)``.
    """
    version, internal, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global RNG states captured by :func:`capture_rng`."""
    if "python" in state:
        py = state["python"]
        internal = tuple(int(x) for x in torch.as_tensor(py["state"]).tolist())
        random.setstate((int(py["version"]), internal, py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = np.asarray(torch.as_tensor(npy["keys"]).numpy(), dtype=np.uint32)
        np.random.set_state(
            (
                npy["algorithm"],
                keys,
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
    cuda = list(state.get("cuda") or [])
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn(
                "the checkpoint holds CUDA RNG states but CUDA is not available here; they "
                "were not restored",
                TorchkeepWarning,
                stacklevel=3,
            )
            return
        count = torch.cuda.device_count()
        for index, device_state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(torch.as_tensor(device_state).cpu(), index)
        if len(cuda) != count:
            warnings.warn(
                f"the checkpoint holds RNG states of {len(cuda)} CUDA devices and this machine "
                f"has {count}; the first {min(count, len(cuda))} were restored",
                TorchkeepWarning,
                stacklevel=3,
            )


__all__ = [
    "capture",
    "capture_rng",
    "check",
    "kind_of",
    "module_state",
    "namespace_paths",
    "restore",
    "restore_rng",
    "revive_namespaces",
    "shaped_like",
    "type_name",
    "weights_of",
]
