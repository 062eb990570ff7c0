"""Lightning: torchkeep checkpoints from ``Trainer`` and ``Fabric``, with one plugin.

>>> import torchkeep as tk
>>> trainer = L.Trainer(plugins=[tk.lightning.CheckpointIO()])
>>> fabric = L.Fabric(plugins=[tk.lightning.CheckpointIO(async_save=True)])

:class:`CheckpointIO` writes every checkpoint Lightning asks for as a native torchkeep folder
at the path Lightning chose (``epoch=3-step=120.ckpt/`` holding safetensors shards and
``checkpoint.json``, written last and renamed into place), so ``ModelCheckpoint`` keeps
naming, ranking and deleting checkpoints as it always does. It reads those folders and the
``.ckpt`` files plain Lightning writes, both through torchkeep's checking reader: nothing in a
file runs code unless the plugin was made with ``trust=True``.

``LightningModule.load_from_checkpoint`` reads files with ``torch.load`` and never asks the
plugin; :func:`load_from_checkpoint` is its counterpart for any checkpoint the plugin reads.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from torchkeep._common import MANIFEST, TEMP_MARKER, parse_size
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptFileError,
    InvalidArgumentError,
    MissingDependencyError,
    UnsupportedValueError,
)
from torchkeep.formats.manifest import read_manifest
from torchkeep.formats.tree import Unflattener
from torchkeep.storage.local import remove_leftovers, remove_tree
from torchkeep.storage.locate import needs_staging
from torchkeep.training import checkpoint as _checkpoint
from torchkeep.training.checkpoint import (
    DEFAULT_SHARD_SIZE,
    StagingPool,
    take_snapshot,
    write_native,
)

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _LightningCheckpointIO
    from lightning.fabric.utilities.data import AttributeDict
    from lightning.pytorch.core.saving import _load_state
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint
except ImportError as exc:
    if exc.name is None or exc.name.split(".")[0] != "lightning":
        raise
    raise MissingDependencyError(
        "torchkeep.lightning needs the 'lightning' package, which is not installed: run "
        "pip install torchkeep[lightning] (or pip install lightning)"
    ) from exc

PathLike = str | os.PathLike[str]
ModuleT = TypeVar("ModuleT", "pl.LightningModule", "pl.LightningDataModule")

# Where the manifest's metadata keeps what the state itself cannot say.
_META_KEY = "lightning"
# Lightning's hyper-parameter entries (LightningModule and LightningDataModule) and the
# entries naming their container class.
_HPARAMS = ("hyper_parameters", "datamodule_hyper_parameters")
_HPARAMS_TYPES = ("hparams_type", "datamodule_hparams_type")


def _omegaconf() -> Any:
    """The omegaconf module when it is installed (Lightning's configs use it), else None."""
    try:
        import omegaconf
    except ImportError:
        return None
    return omegaconf


def _qualname(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _known_types() -> dict[str, type]:
    """Container classes a stored ``hparams_type`` name is turned back into.

    A fixed table: a name read from a file is compared with it, never imported.
    """
    known: dict[str, type] = {_qualname(AttributeDict): AttributeDict, "builtins.dict": dict}
    omegaconf = _omegaconf()
    if omegaconf is not None:
        for kind in (omegaconf.DictConfig, omegaconf.ListConfig):
            known[_qualname(kind)] = kind
    return known


def _storable(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lightning's checkpoint dict as entries the native format holds, and what was changed.

    Hyper-parameters held in omegaconf containers are stored as plain containers and their
    container class (``hparams_type``, a class object) by name; the model's state dict keeps
    torch's per-module version record. The second value records each change for
    :func:`_restored`.
    """
    state = dict(checkpoint)
    notes: dict[str, Any] = {"omegaconf": [], "types": {}}
    omegaconf = _omegaconf()
    for key in _HPARAMS:
        value = state.get(key)
        if omegaconf is not None and isinstance(value, omegaconf.Container):
            state[key] = omegaconf.OmegaConf.to_container(value, resolve=False)
            notes["omegaconf"].append(key)
    for key in _HPARAMS_TYPES:
        value = state.get(key)
        if isinstance(value, type):
            state[key] = _qualname(value)
            notes["types"][key] = state[key]
    versions = getattr(state.get("state_dict"), "_metadata", None)
    if isinstance(versions, Mapping):
        notes["state_dict_metadata"] = {str(k): dict(v) for k, v in versions.items()}
    return state, notes


def _restored(values: dict[str, Any], notes: Mapping[str, Any]) -> dict[str, Any]:
    """Undo :func:`_storable` on the values read from a native checkpoint."""
    omegaconf = _omegaconf()
    for key in notes.get("omegaconf") or ():
        if omegaconf is not None and isinstance(values.get(key), dict | list):
            values[key] = omegaconf.OmegaConf.create(values[key])
    known = _known_types()
    for key, name in (notes.get("types") or {}).items():
        if values.get(key) == name and name in known:
            values[key] = known[name]
    weights = values.get("state_dict")
    if isinstance(weights, Mapping):
        ordered: OrderedDict[str, Any] = OrderedDict(weights)
        versions = notes.get("state_dict_metadata")
        if isinstance(versions, Mapping):
            ordered._metadata = OrderedDict(versions)  # type: ignore[attr-defined]
        values["state_dict"] = ordered
    return values


def _no_tensor(name: str) -> torch.Tensor:
    raise CorruptFileError(f"the manifest's metadata refers to a tensor {name!r}")


def _notes_of(folder: Path) -> Mapping[str, Any]:
    raw = read_manifest(folder).get("metadata") or {}
    metadata = Unflattener(_no_tensor, where=str(folder / MANIFEST)).decode(raw, "metadata")
    notes = metadata.get(_META_KEY) if isinstance(metadata, dict) else None
    return notes if isinstance(notes, dict) else {}


def _device_of(map_location: Any) -> str | torch.device | None:
    """The device ``map_location`` names; None (the CPU) for functions and mappings."""
    if isinstance(map_location, str | torch.device):
        return map_location
    return None


def _local(path: PathLike, verb: str) -> Path:
    if needs_staging(path):
        raise InvalidArgumentError(
            f"torchkeep.lightning.CheckpointIO {verb} local paths only, got {str(path)!r}: "
            "give ModelCheckpoint a local dirpath, or save with torchkeep.CheckpointManager, "
            "which writes to fsspec URLs"
        )
    return Path(path)


def _unsupported(exc: UnsupportedValueError) -> UnsupportedValueError:
    hint = ""
    parts = [part.split("[")[0] for part in exc.path.split(".")]
    if len(parts) > 1 and parts[0] in _HPARAMS:
        hint = (
            " It is a hyper-parameter: leave it out with "
            f"self.save_hyperparameters(ignore=[{parts[1]!r}])."
        )
    return UnsupportedValueError(
        f"{exc}{hint} With the Lightning plugin: CheckpointIO(allow_pickle=True) stores such "
        "values in a pickle side file, read back only by CheckpointIO(trust=True).",
        path=exc.path,
    )


class CheckpointIO(_LightningCheckpointIO):
    """Lightning's checkpoint plugin, writing and reading torchkeep checkpoints.

    ``Trainer(plugins=[CheckpointIO()])`` or ``Fabric(plugins=[CheckpointIO()])``. Each
    checkpoint is a native torchkeep folder at the path Lightning gives (tensors in
    safetensors shards, the rest as JSON in ``checkpoint.json``, written last), committed by
    one rename. Plain Lightning ``.ckpt`` files load too, through the checking unpickler.

    Args:
        async_save: write in a background thread. The state is copied into reusable buffers
            before ``save_checkpoint`` returns, so training goes on while the files are
            written; at most one save is in flight (the next one waits for it), removals
            and loads wait for it, and ``teardown`` (the end of ``fit``) waits for it and
            raises its error.
        trust: read pickled content with torch's and Python's own unpicklers (only for
            files from a trusted source).
        allow_globals: ``"module.name"`` classes that may be unpickled besides the
            allowlist, for hyper-parameter objects of your own classes.
        allow_pickle: store values that have no pickle-free form (objects of your own
            classes in the hyper-parameters, say) in a pickle side file, which then loads
            only with ``trust=True`` or ``allow_globals``. Without it such a save is refused
            with :class:`~torchkeep.UnsupportedValueError`, naming the value.
        max_shard_size: the largest safetensors shard (``"256MB"``).
        verify: check every tensor against the checksum recorded at save time when loading.

    Raises:
        InvalidArgumentError: ``max_shard_size`` is not a size.
    """

    def __init__(
        self,
        *,
        async_save: bool = False,
        trust: bool = False,
        allow_globals: Iterable[str] = (),
        allow_pickle: bool = False,
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
        verify: bool = False,
    ) -> None:
        super().__init__()
        parse_size(max_shard_size)  # a bad size fails here, not in the middle of training
        self.async_save = async_save
        self.trust = trust
        self.allow_globals = tuple(allow_globals)
        self.allow_pickle = allow_pickle
        self.max_shard_size = max_shard_size
        self.verify = verify
        self._setup_runtime()

    def _setup_runtime(self) -> None:
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._staging = StagingPool()

    def __getstate__(self) -> dict[str, Any]:
        # Threads, locks and buffers stay with the process (spawned workers pickle plugins).
        self.wait()
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_lock", "_executor", "_pending", "_staging")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup_runtime()

    # ------------------------------------------------------------------------ background

    def _submit(self, work: Callable[[], None]) -> None:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="torchkeep-lightning")
            self._pending.append(self._executor.submit(work))

    def wait(self) -> None:
        """Wait for the saves and removals in flight, raising the first error among them."""
        with self._lock:
            pending, self._pending = self._pending, []
            error: BaseException | None = None
            for future in pending:
                found = future.exception()
                error = error or found
            if error is not None:
                raise error

    # ---------------------------------------------------------------------------- verbs

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` as a native torchkeep folder at ``path``, atomically.

        Args:
            checkpoint: Lightning's checkpoint dict (or Fabric's state, its objects already
                turned into state dicts).
            path: the folder to write; an existing checkpoint there is replaced only once
                the new one is complete.
            storage_options: not supported; must be None.

        Raises:
            UnsupportedValueError: a value without a pickle-free form (see ``allow_pickle``).
            CheckpointWriteError: the disk refused a write (raised here, or by the next call
                after an asynchronous save); nothing was committed.
            InvalidArgumentError: ``storage_options``, a URL, or a path that is a file or a
                folder that is not a checkpoint.
        """
        if storage_options is not None:
            raise InvalidArgumentError(
                "torchkeep.lightning.CheckpointIO takes no storage_options; its options "
                "(max_shard_size, allow_pickle, ...) are given when it is made"
            )
        target = _local(path, "saves to")
        with self._lock:
            self.wait()  # one save at a time: the staging buffers are reused
            state, notes = _storable(checkpoint)
            try:
                snapshot = take_snapshot(
                    state,
                    rng=False,  # the dict is Lightning's whole state; it keeps no RNG states
                    allow_pickle=self.allow_pickle,
                    metadata={_META_KEY: notes},
                    staging=self._staging if self.async_save else None,
                )
            except UnsupportedValueError as exc:
                raise _unsupported(exc) from exc

            def write() -> None:
                write_native(snapshot, target, max_shard_size=self.max_shard_size)
                # What interrupted saves of this path left beside it (hidden temporary names).
                remove_leftovers(target.parent, target.name + TEMP_MARKER)

            self._submit(write)
            if not self.async_save:
                self.wait()

    def load_checkpoint(
        self,
        path: PathLike,
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint: a torchkeep folder, or a ``.ckpt`` file plain Lightning wrote.

        Args:
            path: the checkpoint.
            map_location: a device (``"cuda:0"``) for the tensors; anything else (a
                function, a mapping) leaves them on the CPU, from where Lightning copies
                them into the model and the optimizer.
            weights_only: ignored: files are always read by the checking unpickler, and
                ``trust=``/``allow_globals=`` given to the plugin decide what it accepts.

        Returns:
            The checkpoint dict, as Lightning wrote it.

        Raises:
            CheckpointNotFoundError: nothing at ``path``.
            UnsafeFileError: the file holds objects the allowlist refuses (pass
                ``trust=True`` or ``allow_globals`` to the plugin if the file is trusted).
            CorruptFileError: a folder that was never committed, or damaged files.
        """
        del weights_only
        source = _local(path, "reads from")
        self.wait()
        if not source.exists():
            raise CheckpointNotFoundError(
                f"no checkpoint at {str(source)!r}: the path does not exist"
            )
        values = _checkpoint.load_checkpoint(
            source,
            rng=False,
            verify=self.verify,
            trust=self.trust,
            allow_globals=self.allow_globals,
            device=_device_of(map_location),
        )
        notes = _notes_of(source) if source.is_dir() else {}
        return _restored(values, notes)

    def remove_checkpoint(self, path: PathLike) -> None:
        """Delete the checkpoint at ``path`` (folder or file); a missing one is ignored.

        A folder is renamed out of sight first, so a crash mid-deletion never leaves a
        partial checkpoint under its name. With ``async_save`` the removal runs after the
        saves queued before it, so a checkpoint is never deleted before its successor is
        committed.
        """
        target = _local(path, "removes")
        self._submit(lambda: _remove(target))
        if not self.async_save:
            self.wait()

    def teardown(self) -> None:
        """Wait for the work in flight (raising its error) and stop the writer thread."""
        with self._lock:
            try:
                self.wait()
            finally:
                if self._executor is not None:
                    self._executor.shutdown(wait=True)
                    self._executor = None

    def __repr__(self) -> str:
        return (
            f"CheckpointIO(async_save={self.async_save}, trust={self.trust}, "
            f"allow_pickle={self.allow_pickle}, max_shard_size={self.max_shard_size!r})"
        )


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # a link (ModelCheckpoint(save_last="link")) goes, not its target
    elif path.is_dir():
        remove_tree(path)


def load_from_checkpoint(
    cls: type[ModuleT],
    path: PathLike,
    *,
    map_location: Any | None = None,
    strict: bool | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    verify: bool = False,
    **kwargs: Any,
) -> ModuleT:
    """``cls.load_from_checkpoint(path)`` for the checkpoints :class:`CheckpointIO` reads.

    Lightning's own ``load_from_checkpoint`` opens the path with ``torch.load``, which can
    read neither a torchkeep folder nor, safely, an untrusted file. This reads the checkpoint
    through the plugin (the checking unpickler) and hands the dict to Lightning's own
    restoring code: ``cls`` is built from the saved hyper-parameters (updated by ``kwargs``),
    its ``on_load_checkpoint`` hook runs and its weights are loaded.

    Args:
        cls: the ``LightningModule`` (or ``LightningDataModule``) class.
        path: a torchkeep checkpoint folder or a plain Lightning ``.ckpt`` file.
        map_location: a device for the weights (default: the CPU).
        strict: as for ``LightningModule.load_from_checkpoint``.
        trust: see :class:`CheckpointIO`.
        allow_globals: see :class:`CheckpointIO`.
        verify: check every tensor against its recorded checksum.
        **kwargs: hyper-parameters that override the saved ones.

    Returns:
        The restored module, on the device of its loaded weights.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        UnsafeFileError: the file needs ``trust=True`` or ``allow_globals``.

    Example:
        >>> model = tk.lightning.load_from_checkpoint(LitModel, "checkpoints/last.ckpt")
    """
    plugin = CheckpointIO(trust=trust, allow_globals=allow_globals, verify=verify)
    checkpoint = plugin.load_checkpoint(path, map_location=map_location)
    checkpoint = _pl_migrate_checkpoint(checkpoint, checkpoint_path=os.fspath(path))
    hparams = checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    hparams.update(kwargs)
    loaded = _load_state(cls, checkpoint, strict=strict, **kwargs)
    if isinstance(loaded, pl.LightningModule):
        weights = checkpoint.get("state_dict") or {}
        first = next((t for t in weights.values() if isinstance(t, torch.Tensor)), None)
        if first is not None:
            loaded = loaded.to(first.device)
    return loaded  # type: ignore[return-value]


__all__ = ["CheckpointIO", "load_from_checkpoint"]
