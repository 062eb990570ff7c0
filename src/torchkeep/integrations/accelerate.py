"""``Accelerator.save_state`` / ``load_state`` through torchkeep: atomic, checksummed, no pickle.

One line switches an accelerate script over::

    accelerator = Accelerator(project_config=ProjectConfiguration(
        project_dir="runs/a", automatic_checkpoint_naming=True, total_limit=3))
    tk.accelerate.install(accelerator)
    ...
    accelerator.save_state()      # runs/a/checkpoints/checkpoint_<i>, as accelerate names it
    accelerator.load_state()      # the newest one

:func:`save_state` and :func:`load_state` are the same operations as functions, for code that
prefers to call them by name. A state folder holds:

- ``model.safetensors``, ``model_1.safetensors``, ...: each prepared model's weights, under
  accelerate's names, written by torchkeep's safetensors writer (per-tensor xxh3 checksums);
- ``training_state/``: a native torchkeep checkpoint (safetensors shards and
  ``checkpoint.json``) with the optimizers, schedulers, stateful dataloaders, the gradient
  scaler, the objects passed to ``register_for_checkpointing``, ``accelerator.step`` and the
  RNG states of Python, numpy, torch and CUDA.

The folder is filled under a hidden temporary name and renamed into place when complete, so a
save that dies leaves the previous state as the newest one. ``total_limit`` removes the
oldest folders only after the new one is in place. Nothing is pickled on save; states that
accelerate itself wrote load too, their pickles read by torchkeep's checking unpickler.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchkeep._common import MANIFEST
from torchkeep.errors import (
    CheckpointNotFoundError,
    InvalidArgumentError,
    InvalidStateError,
    KeyMismatchError,
    MissingDependencyError,
    UnsupportedValueError,
)
from torchkeep.safety.unpickle import safe_torch_load
from torchkeep.storage.local import atomic_dir, remove_leftovers, remove_tree
from torchkeep.training.checkpoint import (
    DEFAULT_SHARD_SIZE,
    read_manifest,
    restore_from,
    take_snapshot,
    write_native,
)
from torchkeep.training.data import ResumableLoader
from torchkeep.weights.api import load, save

try:
    import accelerate
    from accelerate.utils import DistributedType
except ImportError as _missing:
    raise MissingDependencyError(
        "torchkeep.accelerate needs the accelerate package, which is not installed: "
        "pip install torchkeep[accelerate]"
    ) from _missing

STATE_DIR = "training_state"
CHECKPOINTS = "checkpoints"
_NUMBERED = re.compile(r"checkpoint_(\d+)")
RNG_FILE = "random_states_0.pkl"
# What accelerate's save_state writes for each training object (weights and RNG apart).
_ACCELERATE_FILE = re.compile(
    r"((?:optimizer|scheduler|dl_state_dict)(?:_\d+)?)\.bin|(scaler)\.pt|(custom_checkpoint_\d+)\.pkl"
)


def install(accelerator: Any) -> None:
    """Route ``accelerator.save_state`` and ``accelerator.load_state`` through torchkeep.

    Only this accelerator object changes: its two methods become :func:`save_state` and
    :func:`load_state` bound to it; accelerate itself is not modified.

    Args:
        accelerator: an ``accelerate.Accelerator`` of a single-process run.

    Raises:
        InvalidStateError: ``accelerator`` is not an Accelerator, or runs several processes,
            DeepSpeed, FSDP, Megatron-LM or XLA, whose states torchkeep does not write.

    Example:
        >>> accelerator = Accelerator(project_config=config)
        >>> tk.accelerate.install(accelerator)
        >>> accelerator.save_state()  # atomic, checksummed, no pickle
    """
    _check_supported(accelerator)
    accelerator.save_state = functools.partial(save_state, accelerator)
    accelerator.load_state = functools.partial(load_state, accelerator)


def save_state(
    accelerator: Any,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    safe_serialization: bool = True,
) -> Path:
    """Save what ``accelerator.save_state`` saves, as one folder committed atomically.

    With ``automatic_checkpoint_naming`` the folder is ``<project_dir>/checkpoints/
    checkpoint_<iteration>`` and ``project_configuration.iteration`` is advanced, as accelerate
    does; ``total_limit`` then removes the oldest numbered folders beyond the limit, after the
    new one is in place. Hooks registered with ``register_save_state_pre_hook`` run first and
    see the folder being written (a hidden temporary name): files they write there are
    committed with the rest.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        output_dir: the folder to write, when automatic naming is off. An existing state
            folder there is replaced; any other non-empty folder is refused.
        safe_serialization: accepted for compatibility; torchkeep writes safetensors only.

    Returns:
        The folder written.

    Raises:
        InvalidArgumentError: no ``output_dir`` without automatic naming, the numbered folder
            exists already, ``output_dir`` holds other files, or ``safe_serialization=False``.
        UnsupportedValueError: a registered object's ``state_dict()`` holds a value that
            cannot be stored without pickle.
        CheckpointWriteError: the disk refused a write; nothing was committed.
    """
    _check_supported(accelerator)
    if not safe_serialization:
        raise InvalidArgumentError(
            "safe_serialization=False asks for pickled weights, which torchkeep's accelerate "
            "states never hold; drop the argument (weights are written as safetensors)"
        )
    config = accelerator.project_configuration
    root: Path | None = None
    if config.automatic_checkpoint_naming:
        root = Path(accelerator.project_dir) / CHECKPOINTS
        target = root / f"checkpoint_{config.iteration}"
        if target.exists():
            raise InvalidArgumentError(
                f"state folder {str(target)!r} exists already (save iteration "
                f"{config.iteration}); after resuming, set "
                "accelerator.project_configuration.iteration to the next free number"
            )
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root, "checkpoint_")
    elif output_dir is None:
        raise InvalidArgumentError(
            "save_state needs output_dir when the accelerator's ProjectConfiguration does not "
            "set automatic_checkpoint_naming=True"
        )
    else:
        target = Path(os.path.expanduser(output_dir))
        if target.is_file() or (
            target.is_dir() and any(target.iterdir()) and not _is_torchkeep_state(target)
        ):
            raise InvalidArgumentError(
                f"{str(target)!r} exists and is not a torchkeep accelerate state; refusing to "
                "replace it: choose a new or empty folder"
            )
    weights = [accelerator.get_state_dict(model, unwrap=False) for model in accelerator._models]
    metadata = {
        "accelerate": {
            "version": str(accelerate.__version__),
            "models": len(weights),
            "custom_objects": len(accelerator._custom_objects),
        }
    }
    try:
        snapshot = take_snapshot(_training_objects(accelerator), metadata=metadata)
    except UnsupportedValueError as exc:
        raise UnsupportedValueError(
            f"cannot save the accelerate state: the value at {exc.path!r} cannot be stored "
            "without pickle, and torchkeep's accelerate states hold none. Make that "
            "object's state_dict() return tensors, numpy arrays, numbers, strings, None, "
            "lists, tuples or dicts instead.",
            path=exc.path,
        ) from exc
    with atomic_dir(target) as temp:
        for hook in list(accelerator._save_model_state_pre_hook.values()):
            hook(accelerator._models, weights, str(temp))
        for index, weight in enumerate(weights):
            save(weight, temp / _indexed("model", index, ".safetensors"))
        write_native(snapshot, temp / STATE_DIR, max_shard_size=DEFAULT_SHARD_SIZE)
    if root is not None:
        config.iteration += 1
        if config.total_limit is not None:
            _apply_limit(root, config.total_limit, keep=target)
    return target


def load_state(
    accelerator: Any,
    input_dir: str | os.PathLike[str] | None = None,
    *,
    strict: bool = True,
    verify: bool = False,
    trust: bool = False,
) -> None:
    """Restore what :func:`save_state` (or accelerate's own ``save_state``) saved.

    Models get their weights, then optimizers, schedulers, stateful dataloaders, the gradient
    scaler and registered objects their states, ``accelerator.step`` its value, and the RNG
    states of Python, numpy, torch and CUDA are restored last. Every training object is
    checked against the state before any is changed. Hooks registered with
    ``register_load_state_pre_hook`` run first; models they remove from the list they are
    given are not loaded.

    A folder that accelerate wrote itself (``optimizer.bin``, ``random_states_0.pkl``, ...)
    loads too: its pickles go through torchkeep's checking unpickler, which runs no code.

    Args:
        accelerator: the ``accelerate.Accelerator``, prepared as when the state was saved.
        input_dir: the state folder; None takes the newest ``checkpoint_<i>`` under
            ``<project_dir>/checkpoints`` (automatic naming).
        strict: refuse model weights whose names or shapes do not match exactly.
        verify: check every tensor against the checksum recorded when it was saved.
        trust: let pickles in a folder accelerate wrote import their classes (for objects
            registered for checkpointing whose state holds user classes).

    Raises:
        CheckpointNotFoundError: no such folder, or no saved state under the project.
        KeyMismatchError: the state holds other models or objects than the accelerator has.
        UnsafeFileError: a pickle in a folder accelerate wrote needs ``trust=True``.
        ChecksumError: with ``verify``, a tensor changed since it was saved.
    """
    _check_supported(accelerator)
    folder = _source(accelerator, input_dir)
    models = list(accelerator._models)
    for hook in list(accelerator._load_model_state_pre_hook.values()):
        hook(models, str(folder))
    if _is_torchkeep_state(folder):
        _load_torchkeep(accelerator, folder, models, strict=strict, verify=verify)
    else:
        _load_accelerate(accelerator, folder, models, strict=strict, trust=trust)


# ------------------------------------------------------------------------------ helpers


def _check_supported(accelerator: Any) -> None:
    if not isinstance(accelerator, accelerate.Accelerator):
        raise InvalidStateError(
            f"expected an accelerate.Accelerator, got a {type(accelerator).__name__}; pass the "
            "Accelerator whose state to save or load"
        )
    kind = accelerator.distributed_type
    if kind != DistributedType.NO or accelerator.num_processes != 1:
        raise InvalidStateError(
            f"torchkeep writes accelerate states of single-process runs; this one is "
            f"{getattr(kind, 'value', kind)} with {accelerator.num_processes} process(es). Use "
            "accelerate's own save_state/load_state here, or torchkeep.CheckpointManager, which "
            "saves distributed runs through torch.distributed.checkpoint"
        )


def _indexed(stem: str, index: int, suffix: str) -> str:
    """Accelerate's file names: ``optimizer.bin``, ``optimizer_1.bin``, ..."""
    return f"{stem}{f'_{index}' if index else ''}{suffix}"


def _training_objects(accelerator: Any) -> dict[str, object]:
    """Everything but the weights, under accelerate's file stems."""
    state: dict[str, object] = {}
    for index, optimizer in enumerate(accelerator._optimizers):
        state[_indexed("optimizer", index, "")] = optimizer
    for index, scheduler in enumerate(accelerator._schedulers):
        state[_indexed("scheduler", index, "")] = scheduler
    wrapped = [
        obj.loader for obj in accelerator._custom_objects if isinstance(obj, ResumableLoader)
    ]
    for index, loader in enumerate(accelerator._dataloaders):
        # A loader wrapped in a registered ResumableLoader is saved by the wrapper.
        if getattr(loader, "use_stateful_dataloader", False) and all(
            loader is not w for w in wrapped
        ):
            state[_indexed("dl_state_dict", index, "")] = loader
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    for index, obj in enumerate(accelerator._custom_objects):
        state[f"custom_checkpoint_{index}"] = obj
    state["step"] = int(accelerator.step)
    return state


def _is_torchkeep_state(folder: Path) -> bool:
    return (folder / STATE_DIR / MANIFEST).is_file()


def _numbered(root: Path) -> list[tuple[int, Path]]:
    """The visible ``checkpoint_<i>`` folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NUMBERED.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _apply_limit(root: Path, limit: int, keep: Path) -> None:
    folders = [path for _, path in _numbered(root) if path != keep]
    excess = len(folders) + 1 - max(limit, 1)
    for path in folders[: max(excess, 0)]:
        remove_tree(path)


def _source(accelerator: Any, input_dir: str | os.PathLike[str] | None) -> Path:
    if input_dir is not None:
        folder = Path(os.path.expanduser(input_dir))
        if not folder.is_dir():
            raise CheckpointNotFoundError(
                f"no accelerate state at {str(folder)!r}: the folder does not exist"
            )
        return folder
    if not accelerator.project_configuration.automatic_checkpoint_naming:
        raise InvalidArgumentError(
            "load_state needs input_dir when the accelerator's ProjectConfiguration does not "
            "set automatic_checkpoint_naming=True"
        )
    root = Path(accelerator.project_dir) / CHECKPOINTS
    numbered = _numbered(root)
    if not numbered:
        raise CheckpointNotFoundError(
            f"no saved state under {str(root)!r}: save one with accelerator.save_state() first"
        )
    return numbered[-1][1]


def _load_models(
    models: Sequence[torch.nn.Module],
    folder: Path,
    *,
    strict: bool,
    verify: bool = False,
    trust: bool = False,
) -> None:
    for index, model in enumerate(models):
        path = folder / _indexed("model", index, ".safetensors")
        if not path.is_file():
            path = folder / _indexed("pytorch_model", index, ".bin")
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"{str(folder)!r} holds no weights for model {index} "
                f"({_indexed('model', index, '.safetensors')}); it was saved with fewer models "
                "than this accelerator prepared"
            )
        load(model, path, strict=strict, verify=verify, trust=trust)


def _load_torchkeep(
    accelerator: Any, folder: Path, models: Sequence[torch.nn.Module], *, strict: bool, verify: bool
) -> None:
    state_path = folder / STATE_DIR
    held = set(read_manifest(state_path)["state"]) - {"step"}
    targets = _training_objects(accelerator)
    targets.pop("step")
    targets, held = _loader_entries(targets, held)
    _compare(folder, held, set(targets))
    _load_models(models, folder, strict=strict, verify=verify)
    rest = restore_from(
        state_path,
        targets,
        rng=True,
        verify=verify,
        trust=False,
        allow_globals=(),
        strict=True,
        device=None,
    )
    if "step" in rest:
        accelerator.step = int(rest["step"])


def _loader_entries(
    targets: dict[str, object], held: set[str]
) -> tuple[dict[str, object], set[str]]:
    """Dataloader positions are restored where both sides have them, as accelerate does.

    A stateful dataloader the state does not hold keeps its position; a position held for
    a loader that a registered ResumableLoader now saves is left to the wrapper.
    """
    loaders = {n for n in held | set(targets) if n.startswith("dl_state_dict")}
    keep = loaders & held & set(targets)
    return (
        {k: v for k, v in targets.items() if k not in loaders or k in keep},
        {n for n in held if n not in loaders or n in keep},
    )


def _compare(folder: Path, held: set[str], expected: set[str]) -> None:
    """Refuse a state whose objects differ from the accelerator's, before anything changes."""
    if held == expected:
        return
    parts = []
    if held - expected:
        parts.append(
            f"state for {', '.join(sorted(held - expected))}, which this accelerator lacks"
        )
    if expected - held:
        parts.append(f"no state for {', '.join(sorted(expected - held))}")
    raise KeyMismatchError(
        f"{str(folder)!r} holds {' and '.join(parts)}; nothing was loaded. Prepare the same "
        "optimizers, schedulers and dataloaders and register the same objects (in the same "
        "order) with accelerator.register_for_checkpointing as when the state was saved",
        None,
    )


def _load_accelerate(
    accelerator: Any, folder: Path, models: Sequence[torch.nn.Module], *, strict: bool, trust: bool
) -> None:
    """Load a folder written by accelerate's own ``save_state``, its pickles read safely."""
    rng_file = folder / RNG_FILE
    if not rng_file.is_file():
        raise CheckpointNotFoundError(
            f"{str(folder)!r} is not an accelerate state: it holds neither {STATE_DIR}/{MANIFEST} "
            f"(torchkeep) nor {RNG_FILE} (accelerate); pass a folder accelerator.save_state wrote"
        )
    targets = _training_objects(accelerator)
    targets.pop("step")
    held = {stem for p in folder.iterdir() if (stem := _stem(p.name)) is not None}
    targets, held = _loader_entries(targets, held)
    _compare(folder, held, set(targets))
    values = {n: _read_pickle(folder / _accelerate_file(n), trust) for n in targets}
    rng = _read_pickle(rng_file, trust)
    _load_models(models, folder, strict=strict, trust=trust)
    for name, value in values.items():
        targets[name].load_state_dict(value)  # type: ignore[attr-defined]
    if isinstance(rng, dict):
        _restore_accelerate_rng(rng)
        if "step" in rng:
            accelerator.step = int(rng["step"])


def _stem(file: str) -> str | None:
    """The entry name of a file accelerate writes for a training object, or None."""
    match = _ACCELERATE_FILE.fullmatch(file)
    return next((g for g in match.groups() if g), None) if match else None


def _accelerate_file(name: str) -> str:
    if name == "scaler":
        return "scaler.pt"
    if name.startswith("custom_checkpoint_"):
        return f"{name}.pkl"
    return f"{name}.bin"


def _read_pickle(path: Path, trust: bool) -> Any:
    return safe_torch_load(str(path), map_location="cpu", trust=trust)


def _restore_accelerate_rng(states: dict[str, Any]) -> None:
    with contextlib.suppress(KeyError):
        random.setstate(states["random_state"])
    with contextlib.suppress(KeyError):
        np.random.set_state(states["numpy_random_seed"])
    with contextlib.suppress(KeyError):
        torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


__all__ = ["install", "load_state", "save_state"]
