"""The data position of a training run, saved and restored so a resume continues mid-epoch.

:class:`ResumableLoader` wraps a ``DataLoader`` (or torchdata's ``StatefulDataLoader``) and
is saved like any stateful object: ``mgr.save(step, model=..., data=loader)``,
``mgr.restore(model=..., data=loader)``. The next ``for batch in loader`` after a restore
continues where the saved run was, with the same batches in the same order, and leaves the
random number generators exactly as the saved run had them at that point.

A plain ``DataLoader`` keeps no position, and creating its iterator draws from random number
generators: the worker base seed from the loader's generator (the global one by default), and
a shuffling sampler's seed from the global generator (or its own) when its first batch is
taken. So the wrapper records, when each epoch's iterator is created, the states of those
generators, and counts the batches handed out. Resuming replays the epoch's draws from the
recorded states, skips the batches already consumed in the *sampler* (indices only: no sample
is loaded, no worker runs), and then puts every generator back where the checkpoint left
it. Without that, the new iterator would draw from the restored global generator again, and
every dropout mask after the resume would differ from the uninterrupted run's.

A ``StatefulDataLoader`` keeps its own position; the wrapper saves it, and undoes the draws
its new iterator makes from the global generator on resume (torchdata restores the seeds it
needs from its state, but the iterator still draws fresh ones first).

Limits: batches skipped on resume are not loaded, so randomness inside a plain
``DataLoader``'s workers (random augmentations) is not replayed for them, and worker ``i``
may get different batches than before: for bit-exact resumes with random augmentation in
workers, use a ``StatefulDataLoader``. Iterable-style datasets have no sampler to skip in:
they need a ``StatefulDataLoader`` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from torchkeep.errors import InvalidArgumentError, InvalidStateError

_KIND_PLAIN = "dataloader"
_KIND_STATEFUL = "stateful_dataloader"


class _SkippingSampler:
    """The loader's (batch) sampler, able to hand out an iterator fast-forwarded in advance.

    Its iterator is created lazily, at the first index taken, as the wrapped sampler's would
    be, so an uninterrupted run draws from the generators exactly as without the wrapper.
    """

    def __init__(self, inner: Iterable[Any]) -> None:
        self.inner = inner
        self._primed: Iterator[Any] | None = None

    def prime(self, skip: int) -> None:
        """Create the next iterator now, with ``skip`` items already taken from it."""
        primed = iter(self.inner)
        for _ in range(skip):
            next(primed, None)
        self._primed = primed

    def __iter__(self) -> Iterator[Any]:
        primed, self._primed = self._primed, None
        yield from primed if primed is not None else self.inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]  # len()'s own TypeError if unsized


def _rebuild(loader: DataLoader[Any], sampler: _SkippingSampler) -> DataLoader[Any]:
    """The same loader, drawing its indices through ``sampler``."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": loader.in_order,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=sampler, **options)
    return DataLoader(loader.dataset, batch_size=None, sampler=sampler, **options)


def _is_stateful(loader: object) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


class ResumableLoader:
    """A data loader whose position is saved with the checkpoint, for exact mid-epoch resume.

    Args:
        loader: a ``torch.utils.data.DataLoader`` over a map-style dataset (shuffled or not,
            with or without workers), or a torchdata ``StatefulDataLoader`` (any dataset).

    Iterate it like the loader; every other attribute (``dataset``, ``sampler``,
    ``batch_size``, ...) is the loader's. Pass it to ``CheckpointManager.save`` /
    ``restore`` (or ``save_checkpoint`` / ``load_checkpoint``) with the model; the global
    random state must be restored too (the default, ``rng=True``).

    Example:
        >>> loader = tk.ResumableLoader(DataLoader(data, batch_size=32, shuffle=True))
        >>> resumed = mgr.restore(model=model, optimizer=opt, data=loader)
        >>> epoch = resumed["epoch"] if resumed else 0
        >>> for epoch in range(epoch, epochs):
        ...     for batch in loader:  # after a restore: the rest of the saved epoch
        ...         step += 1
        ...         mgr.save(step, model=model, optimizer=opt, data=loader, epoch=epoch)

    Raises:
        InvalidArgumentError: ``loader`` is not a DataLoader, or is a plain DataLoader over
            an iterable-style dataset (which has no sampler to skip in).
    """

    loader: DataLoader[Any]

    def __init__(self, loader: DataLoader[Any] | ResumableLoader) -> None:
        if isinstance(loader, ResumableLoader):
            loader = loader.loader
        if not isinstance(loader, DataLoader):
            raise InvalidArgumentError(
                f"ResumableLoader wraps a torch DataLoader, got a {type(loader).__name__}"
            )
        self.loader = loader
        self._stateful = _is_stateful(loader)
        self._sampler: _SkippingSampler | None = None
        self._inner: DataLoader[Any] = loader
        if not self._stateful:
            if isinstance(loader.dataset, IterableDataset):
                raise InvalidArgumentError(
                    "a DataLoader over an iterable-style dataset has no sampler to resume in; "
                    "use torchdata's StatefulDataLoader (pip install torchdata), which keeps "
                    "its own position, and wrap that"
                )
            indices = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
            self._sampler = _SkippingSampler(indices)
            self._inner = _rebuild(loader, self._sampler)
        self._consumed = 0  # batches handed out by the current epoch's iterator
        self._running = False  # an epoch's iterator is under way
        self._epoch_start: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the generators

    def _generators(self) -> list[torch.Generator]:
        """The generators a new iterator may draw from, besides the global one."""
        found: list[torch.Generator] = []
        candidates = [self.loader.generator, getattr(self.loader.sampler, "generator", None)]
        batch_sampler = self.loader.batch_sampler
        candidates.append(getattr(getattr(batch_sampler, "sampler", None), "generator", None))
        for generator in candidates:
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
        return found

    def _capture(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "generators": [g.get_state() for g in self._generators()],
        }

    def _set(self, states: Mapping[str, Any], *, global_state: bool = True) -> None:
        if global_state:
            torch.set_rng_state(states["torch"])
        generators = self._generators()
        saved = list(states["generators"])
        if len(saved) != len(generators):
            raise InvalidStateError(
                f"the saved data position has {len(saved)} generator states but this loader "
                f"has {len(generators)} generators; restore into a loader built the same way"
            )
        for generator, state in zip(generators, saved, strict=True):
            generator.set_state(state)

    # ------------------------------------------------------------------------ iterating

    def __iter__(self) -> Iterator[Any]:
        if self._stateful:
            return self._iterate_stateful()
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        assert self._sampler is not None
        pending, self._pending = self._pending, None
        if pending is not None and pending["running"] and pending["consumed"] > 0:
            now = torch.get_rng_state()
            # Replay the saved epoch's draws: the worker base seed (taken first, when the
            # iterator is created), then the sampler's, with the consumed batches skipped.
            self._set(pending["epoch_start"])
            torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)
            self._sampler.prime(pending["consumed"])
            self._set(pending["epoch_start"])
            iterator = iter(self._inner)  # the same base seed as the saved run's
            torch.set_rng_state(now)  # as the checkpoint left it
            self._set(pending["now"], global_state=False)
            self._epoch_start = pending["epoch_start"]
            self._consumed = pending["consumed"]
        else:
            self._epoch_start = self._capture()
            self._consumed = 0
            iterator = iter(self._inner)
        self._running = True
        for batch in iterator:
            self._consumed += 1
            yield batch
        self._running = False
        self._consumed = 0

    def _iterate_stateful(self) -> Iterator[Any]:
        resuming, self._pending = self._pending is not None, None
        if not resuming:
            yield from self.loader
            return
        now = torch.get_rng_state()
        iterator = iter(self.loader)
        first = next(iterator, _END)
        # The saved run drew these seeds when its epoch began, before the checkpoint: the
        # restored iterator's fresh draws would shift every later random number.
        torch.set_rng_state(now)
        if first is _END:
            return
        yield first
        yield from iterator

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet: never look it up on itself
            raise AttributeError(name)
        return getattr(self.loader, name)

    # -------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The position: batches consumed this epoch and the generator states to replay."""
        if self._stateful:
            return {"kind": _KIND_STATEFUL, "loader": self.loader.state_dict()}  # type: ignore[attr-defined]
        return {
            "kind": _KIND_PLAIN,
            "running": self._running,
            "consumed": self._consumed,
            "epoch_start": self._epoch_start,
            "now": {"generators": [g.get_state() for g in self._generators()]},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take a saved position; the next iteration continues from it."""
        kind = state.get("kind") if isinstance(state, Mapping) else None
        wanted = _KIND_STATEFUL if self._stateful else _KIND_PLAIN
        if kind != wanted:
            raise InvalidStateError(
                f"the saved data position is of a {kind or 'unknown'} loader, and this is a "
                f"{wanted}: restore into a loader of the kind that was saved"
            )
        if self._stateful:
            self.loader.load_state_dict(state["loader"])  # type: ignore[attr-defined]
            self._pending = dict(state)
            return
        running, consumed = state.get("running"), state.get("consumed")
        if not isinstance(running, bool) or type(consumed) is not int or consumed < 0:
            raise InvalidStateError(f"the saved data position is damaged: {dict(state)!r}")
        if running and consumed and not isinstance(state.get("epoch_start"), Mapping):
            raise InvalidStateError("the saved data position has no epoch-start state")
        self._set(state["now"], global_state=False)
        self._pending = dict(state)
        self._running, self._consumed = False, 0

    def __repr__(self) -> str:
        return f"ResumableLoader({self.loader!r})"


_END = object()


__all__ = ["ResumableLoader"]
