"""CheckpointManager: numbered checkpoints in one folder, retention, async saves, resume.

Layout: ``<dir>/step-00000120/`` per checkpoint, each a native checkpoint folder committed by
an atomic rename (see :mod:`torchkeep.training.checkpoint`), or, in a distributed run, a
torch.distributed.checkpoint folder committed by rank 0 (see :mod:`torchkeep.distributed.dcp`).
``dir`` may be an fsspec URL (``s3://bucket/run``): files are uploaded first and the commit marker
last (see :mod:`torchkeep.training.steps`). Everything the manager knows is read back from the
folder, so a new manager after a restart governs the older checkpoints too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch

from torchkeep._common import MANIFEST, parse_size
from torchkeep._device import check_device
from torchkeep.errors import (
    CheckpointNotFoundError,
    InvalidArgumentError,
    InvalidStateError,
    ManagerClosedError,
    TorchkeepWarning,
)
from torchkeep.io.recycle import BIN_NAME, RecycleBin
from torchkeep.storage.remote import is_remote, local_path
from torchkeep.training import background
from torchkeep.training.checkpoint import (
    DEFAULT_SHARD_SIZE,
    Snapshot,
    StagingPool,
    restore_from,
    take_snapshot,
    write_native,
)
from torchkeep.training.retention import (
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
from torchkeep.training.steps import LocalSteps, Location, RemoteSteps, Steps, checkpoints

SnapshotMode = Literal["copy", "fork"]


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
        distributed: save through torch.distributed.checkpoint (every rank writes its
            shards, rank 0 commits). None (the default) decides per save: yes when a process
            group is initialized and a module is DDP or holds DTensors (FSDP2). Restoring
            follows what each checkpoint is, and reshards to the current world size.
        storage_options: fsspec options for a URL ``directory`` (``{"endpoint_url": ...}``).
        recycle: keep the files of the checkpoints retention deletes in a hidden folder
            (``.recycle.torchkeep``) until the next save overwrites them, which is several
            times faster than writing new files, at the cost of holding that much more disk
            space between saves. Local folders only.
        snapshot: how a ``blocking=False`` save captures the tensors before it returns.
            ``"copy"`` (the default) copies them into reusable staging buffers (pinned, for
            GPU tensors). ``"fork"`` forks a low-priority writer process that sees the state
            copy-on-write: the call blocks for ``fork()``, whose time grows with the
            process's resident memory (about 30 ms per GB), and no second copy of the state
            is kept; but while the writer lives, each page of the state that training writes
            is first copied by the kernel, which costs more than the copy it spared (see
            docs/performance.md). Choose it when the saved tensors are not written while the
            save runs (saving before evaluation; frozen or EMA weights). It needs
            ``os.fork`` (Linux, macOS), a local folder, CPU tensors and no ``allow_pickle``;
            other saves copy.

    With no policy and no shortcut every checkpoint is kept. The newest checkpoint is never
    deleted. One process (in a distributed run: one job, every rank calling ``save`` and
    ``restore`` in the same order) should write to a folder at a time.

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
        distributed: bool | None = None,
        storage_options: Mapping[str, Any] | None = None,
        recycle: bool = False,
        snapshot: SnapshotMode = "copy",
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise InvalidStateError(
                "CheckpointManager takes the run's folder (a path or URL) first, got a "
                f"{type(directory).__name__}; pass the objects to save to mgr.save(step, ...)"
            )
        if mode not in ("min", "max"):
            raise InvalidArgumentError(
                f"mode must be 'min' (lower {monitor or 'metric'} is better) or 'max', got {mode!r}"
            )
        self.directory: Path | str
        self._steps: Steps
        if is_remote(directory):
            self.directory = str(directory).rstrip("/")
            self._steps = RemoteSteps(self.directory, storage_options)
        else:
            self.directory = Path(local_path(directory))
            self._steps = LocalSteps(self.directory)
        self._storage_options = dict(storage_options or {})
        self._distributed = distributed
        self._group: Any = None
        self.monitor = monitor
        self.mode: Mode = mode
        self.policy = self._policy(keep_last, keep_best, keep_every, policy)
        parse_size(max_shard_size)  # a bad size fails here, not in a background save
        if snapshot not in ("copy", "fork"):
            raise InvalidArgumentError(f"snapshot must be 'copy' or 'fork', got {snapshot!r}")
        self._max_shard_size = max_shard_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
        # Background saves get a thread of their own at low priority (its write threads
        # inherit it): beside a CPU-bound training loop it takes a small share of a core.
        self._background = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torchkeep-save", initializer=background.yield_cpu
        )
        self._pending: Future[Location] | None = None
        self._lock = threading.RLock()
        self._snapshot: SnapshotMode = snapshot
        self._staging = StagingPool()
        self._writer: background.ForkedWrite | None = None  # the latest forked writer
        self._bin: RecycleBin | None = None
        if recycle:
            if not isinstance(self._steps, LocalSteps):
                raise InvalidArgumentError(
                    f"recycle=True works on local folders only, not {self.directory!r}; "
                    "drop recycle= for remote storage"
                )
            self._bin = RecycleBin(Path(self.directory) / BIN_NAME)
            self._steps.recycle = self._bin
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
                raise InvalidArgumentError(
                    "keep_best needs monitor=, the metric to rank checkpoints by "
                    "(monitor='val_loss')"
                )
            parts.append(KeepBest(self.monitor, self.mode, keep_best))
        if keep_every is not None:
            parts.append(KeepEvery(keep_every))
        if policy is not None:
            if parts:
                raise InvalidArgumentError(
                    "pass either policy= or the keep_* shortcuts, not both; combine policies "
                    "with AnyOf(KeepLast(3), KeepBest(...))"
                )
            return policy
        return AnyOf(*parts) if parts else KeepAll()

    # ------------------------------------------------------------------------- listing

    def path(self, step: int) -> Location:
        """The folder (or URL) of ``step``'s checkpoint (``step-00000120``)."""
        return self._steps.location(step)

    def _committed(self) -> list[tuple[int, Location]]:
        return self._steps.committed()

    def steps(self) -> list[int]:
        """The steps of every committed checkpoint, oldest first (torn folders skipped)."""
        return [step for step, _ in self._committed()]

    def latest(self) -> int | None:
        """The highest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def checkpoints(self) -> list[Checkpoint]:
        """Every committed checkpoint with its step, folder and saved metrics."""
        return checkpoints(self._steps)

    def best(self) -> int | None:
        """The committed step with the best ``monitor`` value, or None when none has it.

        Raises:
            InvalidArgumentError: the manager was made without ``monitor``.
        """
        if self.monitor is None:
            raise InvalidArgumentError(
                "best() needs the manager's monitor=, the metric to rank by: "
                "CheckpointManager(directory, monitor='val_loss')"
            )
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
    ) -> Location:
        """Save ``state`` as the checkpoint of ``step``, then apply retention.

        The state is captured before this returns: tensors are copied into reusable staging
        buffers (pinned, for GPU tensors), or seen copy-on-write by a forked writer process
        (the manager's ``snapshot=``), and everything else is frozen into JSON, so training
        may change them at once. The files are written in the background, at low CPU
        priority, and committed by the manager's save thread; with ``blocking=True`` (the
        default) this waits for the commit. At most one save is in flight: a new one first
        waits for the previous, and re-raises its error if it failed.

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
            raise InvalidArgumentError(
                f"step must be a non-negative integer, got {step!r}; call "
                "save(step, model=model, ...) with the training step first"
            )
        with self._lock:
            if self._closed:
                raise ManagerClosedError(
                    f"this CheckpointManager of {str(self.directory)!r} is closed; make a new "
                    "one to save again"
                )
            self._finish()
            if self._uses_dcp(state):
                if allow_pickle:
                    raise InvalidArgumentError(
                        "distributed checkpoints hold no pickle: drop allow_pickle=True, or "
                        "make the values JSON-friendly"
                    )
                # torch.distributed.checkpoint is slow to import; only distributed runs need it.
                from torchkeep.distributed import dcp as _dcp

                dist_snapshot = _dcp.take_snapshot(
                    state,
                    step=step,
                    rng=rng,
                    metrics=metrics,
                    metadata=metadata,
                    copy=not blocking,
                    group=self._dcp_group(),
                )
                self._pending = self._executor.submit(self._commit_dcp, dist_snapshot, step)
                if blocking:
                    self._finish()
                return self.path(step)
            self._staging.share = None if blocking else self._forks(allow_pickle)
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
            if not blocking and self._staging.shared and not self._fork(snapshot, step):
                self._staging.share = None  # fork() failed: copy after all
                snapshot.tensors = self._staging.stage(snapshot.tensors)
            if self._pending is None:
                executor = self._executor if blocking else self._background
                self._pending = executor.submit(self._commit, snapshot, step)
            if blocking:
                self._finish()
        return self.path(step)

    def _forks(self, allow_pickle: bool) -> Callable[[Mapping[str, torch.Tensor]], bool] | None:
        """The staging pool's test of whether a background save forks its writer (None: never)."""
        if (
            self._snapshot == "copy"
            or allow_pickle
            or not isinstance(self._steps, LocalSteps)
            or not background.available()
        ):
            return None
        return background.forkable

    def _fork(self, snapshot: Snapshot, step: int) -> bool:
        """Start a forked writer of ``snapshot`` from the save thread; False if fork failed.

        The fork happens in the background save thread, which lives as long as the manager,
        because a child set to die with its parent dies with the thread that forked it.
        """
        target = Path(self.path(step))  # a local folder: see _forks
        write = background.ForkedWrite(snapshot, target, self._max_shard_size, self._bin)
        forked: Future[int] = Future()
        pending = self._background.submit(self._commit_forked, write, step, forked)
        try:
            forked.result()
        except OSError as exc:
            warnings.warn(
                f"could not fork a writer for step {step} ({exc}); copying the state instead",
                TorchkeepWarning,
                stacklevel=3,
            )
            with contextlib.suppress(OSError):
                pending.result()
            return False
        self._pending, self._writer = pending, write
        return True

    def _commit_forked(
        self, write: background.ForkedWrite, step: int, forked: Future[int]
    ) -> Location:
        try:
            forked.set_result(write.start())
        except BaseException as exc:
            forked.set_exception(exc)
            raise
        try:
            return self._commit(write.snapshot, step, write.commit)
        except BaseException:
            write.abandon()  # stops the child if the commit failed before waiting for it
            raise

    def _uses_dcp(self, state: Mapping[str, object]) -> bool:
        if self._distributed is not None:
            return self._distributed
        distributed = torch.distributed
        if not (distributed.is_available() and distributed.is_initialized()):
            return False  # without a group: no need to import DCP (most of a second)
        from torchkeep.distributed import dcp as _dcp

        return _dcp.wants_dcp(state, None)

    def _dcp_group(self) -> Any:
        """A gloo group of its own, so background saves never interleave with training's."""
        from torchkeep.distributed import dcp as _dcp

        if self._group is None and _dcp.group_active():
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")
        return self._group

    def _commit(self, snapshot: Snapshot, step: int, writer: Any = None) -> Location:
        """Write (with ``writer``: a forked writer's commit) and commit, then retention."""
        if writer is None:
            writer = write_native
            if isinstance(self._steps, LocalSteps):
                # The newest other checkpoint: its unchanged frozen shards are hard-linked.
                previous = next(
                    (
                        Path(p)
                        for s, p in reversed(self._steps.committed())
                        if s != step and (Path(p) / MANIFEST).is_file()
                    ),
                    None,
                )
                writer = functools.partial(write_native, previous=previous, recycle=self._bin)
        path = self._steps.write_native(snapshot, step, self._max_shard_size, writer)
        if self._bin is not None:
            self._bin.clear()  # what this save did not take is not worth keeping longer
        self._retain(step)  # retires the checkpoints retention drops into the bin
        return path

    def torn(self) -> list[Location]:
        """Leftovers of interrupted saves: temporary folders and step folders never committed."""
        return self._steps.torn()

    def prune(self, *, dry_run: bool = False) -> tuple[list[int], list[Location]]:
        """Apply the retention policy now and remove leftovers of interrupted saves.

        The newest committed checkpoint is never deleted.

        Args:
            dry_run: only report what would be removed.

        Returns:
            The steps deleted (or that would be) and the torn folders removed.
        """
        self._finish()
        latest = self.latest()
        doomed = to_delete(
            self.policy, self.checkpoints(), protect=set() if latest is None else {latest}
        )
        torn = self.torn()
        if not dry_run:
            self._steps.remove_torn()
            for checkpoint in doomed:
                self._steps.delete(checkpoint.path)
        return [c.step for c in doomed], torn

    def _commit_dcp(self, snapshot: Any, step: int) -> Location:
        from torchkeep.distributed import dcp as _dcp

        rank0 = not _dcp.group_active() or torch.distributed.get_rank(self._group) == 0
        if rank0:
            self._steps.prepare(step)
        location = _dcp.write(
            snapshot, self.path(step), group=self._group, options=self._storage_options
        )
        if rank0:
            self._retain(step)
        return location

    def _retain(self, step: int) -> None:
        # Only after a successful commit: a failed save must never cost an older checkpoint.
        self._steps.remove_torn()
        for checkpoint in to_delete(self.policy, self.checkpoints(), protect={step}):
            self._steps.delete(checkpoint.path)

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
        allow_globals: Iterable[str] = (),
        strict: bool = True,
        rng: bool = True,
        device: str | torch.device | None = None,
        **targets: object,
    ) -> dict[str, Any] | None:
        """Restore a committed checkpoint into ``targets`` (see :func:`load_checkpoint`).

        Args:
            which: ``"latest"`` (the highest step), ``"best"`` (by ``monitor``) or a step.
            verify, trust, allow_globals, strict, rng, device: as for
                :func:`~torchkeep.load_checkpoint`.
            **targets: objects restored in place.

        Returns:
            The entries not restored in place, or None when there is nothing to resume.

        Raises:
            CheckpointNotFoundError: the step asked for has no committed checkpoint, or
                ``"best"`` when no checkpoint has the monitored metric.
            DeviceError: ``device`` is not available on this machine (checked even when
                there is nothing to resume yet).
        """
        check_device(device, f"restore checkpoints of {str(self.directory)!r}")
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
            raise InvalidArgumentError(
                f"which must be 'latest', 'best' or a step number, got {which!r}; pass the "
                "objects to restore as keywords: restore(model=model, optimizer=opt)"
            )
        if step is None:
            return None
        location = self.path(step)
        if self._steps.is_distributed(location):
            from torchkeep.distributed import dcp as _dcp

            if verify:
                warnings.warn(
                    "verify=True has no effect on distributed checkpoints: DCP stores no checksums",
                    TorchkeepWarning,
                    stacklevel=2,
                )
            return _dcp.restore(
                location,
                targets,
                strict=strict,
                rng=rng,
                device=device,
                group=self._dcp_group(),
                options=self._storage_options,
            )
        with self._steps.local_copy(location) as local:
            return restore_from(
                local,
                targets,
                verify=verify,
                trust=trust,
                allow_globals=allow_globals,
                strict=strict,
                rng=rng,
                device=device,
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
                self._background.shutdown(wait=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, policy={self.policy!r})"


__all__ = ["CheckpointManager"]
