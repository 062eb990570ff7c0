"""CheckpointManager: numbered checkpoints in one folder, retention, async saves, resume.

Layout: ``<dir>/step-00000120/`` per checkpoint, each a native checkpoint folder committed by
an atomic rename (see :mod:`torchkeep.checkpoint`). Everything the manager knows is read back
from the folder, so a new manager after a restart governs the older checkpoints too.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch

from torchkeep._tree import Unflattener
from torchkeep.checkpoint import (
    DEFAULT_SHARD_SIZE,
    MANIFEST,
    Snapshot,
    StagingPool,
    load_checkpoint,
    read_manifest,
    take_snapshot,
    write_native,
)
from torchkeep.errors import CheckpointNotFoundError, CorruptFileError, TorchkeepError
from torchkeep.io.recycle import BIN_NAME, RecycleBin
from torchkeep.retention import (
    AnyOf,
    Checkpoint,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepLast,
    Mode,
    RetentionPolicy,
    ranked,
    to_delete,
)
from torchkeep.storage.local import TEMP_MARKER, temp_sibling

_STEP_DIR = re.compile(r"step-(\d+)")


def _no_tensors(name: str) -> torch.Tensor:
    raise CorruptFileError(f"metrics refer to a tensor {name!r}")


class CheckpointManager:
    """Saves numbered checkpoints into one folder and keeps the ones the policy wants.

    Args:
        directory: the run's folder (created on the first save).
        keep_last: keep this many of the newest checkpoints.
        keep_best: keep this many of the best checkpoints by ``monitor``.
        monitor: the metric :meth:`best` and ``keep_best`` rank by.
        mode: ``"min"`` (losses) or ``"max"`` (accuracies).
        keep_every: also keep every checkpoint whose step is a multiple of this.
        policy: a retention policy object instead of the keyword shortcuts.
        max_shard_size: largest safetensors shard of each checkpoint.
        recycle: keep the files of the checkpoints retention deletes in a hidden folder
            (``.recycle.torchkeep``) until the next save overwrites them, which is several
            times faster than writing new files, at the cost of holding that much more disk
            space between saves.

    With no policy and no shortcut every checkpoint is kept. The newest checkpoint is never
    deleted. One process should write to a folder at a time.

    Example:
        >>> mgr = CheckpointManager("runs/exp1", keep_last=3, keep_best=1, monitor="val_loss")
        >>> extra = mgr.restore(model=model, optimizer=opt)   # None on a fresh run
        >>> mgr.save(step, model=model, optimizer=opt, metrics={"val_loss": v}, blocking=False)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Mode = "min",
        keep_every: int | None = None,
        policy: RetentionPolicy | None = None,
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
        recycle: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.directory = Path(directory)
        self.monitor = monitor
        self.mode: Mode = mode
        self.policy = self._policy(keep_last, keep_best, keep_every, policy)
        self._max_shard_size = max_shard_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
        self._pending: Future[Path] | None = None
        self._lock = threading.RLock()
        self._staging = StagingPool()
        self._bin = RecycleBin(self.directory / BIN_NAME) if recycle else None
        self._metrics: dict[str, tuple[tuple[int, int], dict[str, float]]] = {}
        self._closed = False

    def _policy(
        self,
        keep_last: int | None,
        keep_best: int | None,
        keep_every: int | None,
        policy: RetentionPolicy | None,
    ) -> RetentionPolicy:
        parts: list[RetentionPolicy] = []
        if keep_last is not None:
            parts.append(KeepLast(keep_last))
        if keep_best is not None:
            if self.monitor is None:
                raise ValueError("keep_best needs monitor=, the metric to rank checkpoints by")
            parts.append(KeepBest(self.monitor, self.mode, keep_best))
        if keep_every is not None:
            parts.append(KeepEvery(keep_every))
        if policy is not None:
            if parts:
                raise ValueError("pass either policy= or the keep_* shortcuts, not both")
            return policy
        return AnyOf(*parts) if parts else KeepAll()

    # ------------------------------------------------------------------------- listing

    def path(self, step: int) -> Path:
        """The folder of ``step``'s checkpoint (``step-00000120``)."""
        return self.directory / f"step-{step:08d}"

    def _committed(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _STEP_DIR.fullmatch(entry.name)
            # Without checkpoint.json a folder was never committed: it is torn, not a step.
            if match and (entry / MANIFEST).is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def steps(self) -> list[int]:
        """The steps of every committed checkpoint, oldest first (torn folders skipped)."""
        return [step for step, _ in self._committed()]

    def latest(self) -> int | None:
        """The highest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def _read_metrics(self, path: Path) -> dict[str, float]:
        try:
            stat = (path / MANIFEST).stat()
            key = (stat.st_ino, stat.st_mtime_ns)
            cached = self._metrics.get(path.name)
            if cached is not None and cached[0] == key:
                return cached[1]
            raw = read_manifest(path).get("metrics") or {}
            metrics = Unflattener(_no_tensors, where=str(path)).decode(raw, "metrics")
        except (OSError, TorchkeepError):
            return {}  # unreadable: it is kept or dropped by step alone
        metrics = metrics if isinstance(metrics, dict) else {}
        self._metrics[path.name] = (key, metrics)
        return metrics

    def checkpoints(self) -> list[Checkpoint]:
        """Every committed checkpoint with its step, folder and saved metrics."""
        return [
            Checkpoint(step, path, self._read_metrics(path)) for step, path in self._committed()
        ]

    def best(self) -> int | None:
        """The committed step with the best ``monitor`` value, or None when none has it.

        Raises:
            ValueError: the manager was made without ``monitor``.
        """
        if self.monitor is None:
            raise ValueError("best() needs the manager's monitor=, the metric to rank by")
        order = ranked(self.checkpoints(), self.monitor, self.mode)
        return order[0].step if order else None

    # -------------------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        /,
        *,
        metrics: Mapping[str, object] | None = None,
        metadata: Mapping[str, object] | None = None,
        blocking: bool = True,
        rng: bool = True,
        allow_pickle: bool = False,
        **state: object,
    ) -> Path:
        """Save ``state`` as the checkpoint of ``step``, then apply retention.

        The state is captured before this returns: tensors are copied into reusable staging
        buffers (pinned, for GPU tensors) and everything else is frozen into JSON, so
        training may change them at once. The files are written by a background thread;
        with ``blocking=True`` (the default) this waits for it. At most one save is in
        flight: a new one first waits for the previous, and re-raises its error if it failed.

        Args:
            step: the training step; the folder is ``step-{step:08d}``. Saving an existing
                step replaces that checkpoint.
            metrics: numbers stored with the checkpoint, used by ``keep_best`` and :meth:`best`.
            metadata: JSON-able values stored in the manifest.
            blocking: wait until the checkpoint is committed.
            rng: save the global RNG states.
            allow_pickle: see :func:`~torchkeep.save_checkpoint`.
            **state: the entries, as for :func:`~torchkeep.save_checkpoint`.

        Returns:
            The checkpoint's folder (committed once :meth:`wait` returns).

        Raises:
            CheckpointWriteError: this save (when blocking) or the previous one failed.
            UnsupportedValueError: a value that cannot be stored without pickle.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError("this CheckpointManager is closed")
            self._finish()
            snapshot = take_snapshot(
                state,
                step=step,
                rng=rng,
                allow_pickle=allow_pickle,
                metrics=metrics,
                metadata=metadata,
                # A blocking save holds the caller until the files are written, so the live
                # tensors cannot change meanwhile: copying them first would only cost time.
                staging=None if blocking else self._staging,
            )
            self._pending = self._executor.submit(self._commit, snapshot, step)
            if blocking:
                self._finish()
        return self.path(step)

    def _commit(self, snapshot: Snapshot, step: int) -> Path:
        target = self.path(step)
        if target.is_dir() and not (target / MANIFEST).is_file():
            shutil.rmtree(target)  # a torn folder of this step: never a checkpoint
        # The newest other checkpoint: its unchanged frozen shards are hard-linked.
        previous = next((p for s, p in reversed(self._committed()) if s != step), None)
        path = write_native(
            snapshot,
            target,
            max_shard_size=self._max_shard_size,
            previous=previous,
            recycle=self._bin,
        )
        # Only after a successful commit: a failed save must never cost an older checkpoint.
        self._remove_torn()
        if self._bin is not None:
            self._bin.clear()  # what this save did not take is not worth keeping longer
        for checkpoint in to_delete(self.policy, self.checkpoints(), protect={step}):
            self._delete(checkpoint.path)
        return path

    def _remove_torn(self) -> None:
        for entry in self.directory.iterdir():
            hidden = entry.name.startswith(".step-") and TEMP_MARKER in entry.name
            torn = _STEP_DIR.fullmatch(entry.name) and not (entry / MANIFEST).is_file()
            if (hidden or torn) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def _delete(self, path: Path) -> None:
        # Renamed out of sight first, so a crash mid-deletion never leaves a torn step folder.
        try:
            hidden = temp_sibling(path)
            os.replace(path, hidden)
        except OSError as exc:
            warnings.warn(f"retention could not delete {path}: {exc}", RuntimeWarning, stacklevel=2)
            return
        if self._bin is not None:
            self._bin.retire(hidden)
        shutil.rmtree(hidden, ignore_errors=True)

    def _finish(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                pending.result()

    def wait(self) -> None:
        """Wait for the save in flight, raising its error if it failed."""
        self._finish()

    # ------------------------------------------------------------------------ restoring

    def restore(
        self,
        which: Literal["latest", "best"] | int = "latest",
        /,
        *,
        verify: bool = False,
        trust: bool = False,
        strict: bool = True,
        rng: bool = True,
        device: str | torch.device = "cpu",
        **targets: object,
    ) -> dict[str, Any] | None:
        """Restore a committed checkpoint into ``targets`` (see :func:`load_checkpoint`).

        Args:
            which: ``"latest"`` (the highest step), ``"best"`` (by ``monitor``) or a step.
            verify, trust, strict, rng, device: as for :func:`~torchkeep.load_checkpoint`.
            **targets: objects restored in place.

        Returns:
            The entries not restored in place, or None when there is nothing to resume.

        Raises:
            CheckpointNotFoundError: the step asked for has no committed checkpoint, or
                ``"best"`` when no checkpoint has the monitored metric.
        """
        self._finish()
        if which == "latest":
            step = self.latest()
        elif which == "best":
            step = self.best()
            if step is None and self.steps():
                raise CheckpointNotFoundError(
                    f"no checkpoint in {str(self.directory)!r} has metric {self.monitor!r}"
                )
        elif isinstance(which, int) and not isinstance(which, bool):
            if which not in self.steps():
                raise CheckpointNotFoundError(
                    f"no committed checkpoint for step {which} in {str(self.directory)!r}; "
                    f"steps: {self.steps()}"
                )
            step = which
        else:
            raise ValueError(f"which must be 'latest', 'best' or a step, got {which!r}")
        if step is None:
            return None
        return load_checkpoint(
            self.path(step),
            verify=verify,
            trust=trust,
            strict=strict,
            rng=rng,
            device=device,
            **targets,
        )

    def close(self) -> None:
        """Wait for the save in flight (raising its error) and stop the writer thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._finish()
            finally:
                self._executor.shutdown(wait=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, policy={self.policy!r})"


__all__ = ["CheckpointManager"]
