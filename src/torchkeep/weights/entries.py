"""Which tensor dict of a file holds "the weights": one rule, used by every verb.

A file may hold several flat tensor dicts (*entries*): the root of a plain state dict, the
``state_dict``/``model``/``model_ema`` members of a checkpoint dict, an optimizer's per-parameter
state, a generator state, a loss. Without a model to match against, the weights are chosen by
*rank*, then by *convention*:

1. torchkeep's own bookkeeping (``__torchkeep__``) is never a candidate;
2. a file whose root is nothing but tensors is a state dict: the root wins (rank 3);
3. a named member holding tensors that are not all scalars (rank 2);
4. tensors at the root of a checkpoint dict beside other members (rank 1), unless they are
   only scalars or training bookkeeping (``loss``, ``best_acc1``, ``generator``);
5. optimizer, scheduler, RNG, metric and hyper-parameter members, and dicts holding only
   scalars, come last (rank 0): they are weights of nothing.

Among entries of the same rank the conventional name wins (``state_dict``, then
``model_state_dict``, ``model``, ... and EMA copies after the plain ones), then the larger
entry. With a model, the entry whose names and shapes match the most of the model wins, rank
and convention breaking ties. The choice records the other candidates so reports can say what
else the file holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchkeep._common import BOOKKEEPING
from torchkeep._facts import TensorInfo, numel
from torchkeep.errors import CorruptFileError, EntryNotFoundError

if TYPE_CHECKING:
    from torchkeep.formats._base import Source


# Where checkpoint dicts commonly keep model weights, most likely first.
CONVENTIONAL = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_state",
    "weights",
    "params",
    "ema",
    "model_ema",
    "state_dict_ema",
    "ema_state_dict",
)

# Members that hold training state, never a model's weights.
NOT_WEIGHTS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optimizer_state",
        "optimizer_state_dict",
        "optimizer_states",
        "optim",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "schedulers",
        "scheduler_state_dict",
        "scaler",
        "grad_scaler",
        "amp",
        "rng",
        "rng_state",
        "rng_states",
        "random_states",
        "generator",
        "generators",
        "metrics",
        "loops",
        "callbacks",
        "message_hub",
        "hyper_parameters",
        "hparams",
        "meta",
        "args",
        "config",
        "loss",
        "best_acc1",
        "best_acc",
        "best_loss",
        "best_metric",
        "n_averaged",
    }
)

_SEGMENT = re.compile(r"\[\d+\]")


def segments(path: str) -> list[str]:
    """``optimizer_states[0].state.3`` -> ``["optimizer_states", "state", "3"]``."""
    return [part for part in _SEGMENT.sub(".", path).split(".") if part]


def rank(path: str, infos: Mapping[str, TensorInfo], *, pure_root: bool) -> int:
    """How likely ``path`` holds model weights (see the module docstring); -1: never."""
    parts = segments(path)
    if BOOKKEEPING in parts:
        return -1
    if path == "" and pure_root:
        return 3
    if any(part.lower() in NOT_WEIGHTS for part in parts):
        return 0
    weighty = [
        name
        for name, info in infos.items()
        if numel(info.shape) > 1 and (path or name.lower() not in NOT_WEIGHTS)
    ]
    if not weighty:
        return 0
    return 1 if path == "" else 2


def _convention(path: str) -> int:
    parts = segments(path)
    last = parts[-1].lower() if parts else ""
    try:
        return CONVENTIONAL.index(last)
    except ValueError:
        return len(CONVENTIONAL)


@dataclass(frozen=True)
class Choice:
    """The entry taken as the weights.

    Attributes:
        entry: its path in the file (``""``: the root).
        rank: its rank (see the module docstring); 0 means the file holds nothing that looks
            like model weights.
        others: the file's other entries that could hold weights (rank 1 or more), best first.
        explicit: the caller named the entry.
    """

    entry: str
    rank: int
    others: tuple[str, ...] = ()
    explicit: bool = False


def choose(
    entries: Mapping[str, Mapping[str, TensorInfo]],
    *,
    pure_root: bool,
    where: str,
    entry: str | None = None,
    match: Callable[[Mapping[str, TensorInfo]], int] | None = None,
) -> Choice:
    """The entry of ``entries`` holding the weights.

    Args:
        entries: the file's tensor dicts (``Source.entries()``).
        pure_root: the file's root holds tensors and nothing else.
        where: the file, for messages.
        entry: the caller's choice, checked to exist.
        match: scores an entry against a model (how many names and shapes agree).

    Raises:
        EntryNotFoundError: ``entry`` is not in the file.
        CorruptFileError: the file holds no tensors at all.
    """
    ranks = {path: rank(path, infos, pure_root=pure_root) for path, infos in entries.items()}
    if entry is not None:
        if entry not in entries:
            listed = ", ".join(repr(e) for e in entries) or "none"
            raise EntryNotFoundError(
                f"{where!r} has no tensor dict {entry!r}; its tensor dicts are: {listed}"
            )
        others = tuple(p for p in _ordered(entries, ranks) if p != entry and ranks[p] >= 1)
        return Choice(entry, max(ranks[entry], 0), others, explicit=True)
    candidates = [p for p in _ordered(entries, ranks) if ranks[p] >= 0]
    if not candidates:
        raise CorruptFileError(f"{where!r} holds no tensors to load")
    if match is not None:
        scores = {p: match(entries[p]) for p in candidates}
        best = max(scores.values())
        if best > 0:
            candidates.sort(key=lambda p: -scores[p])  # stable: rank and convention next
    chosen = candidates[0]
    others = tuple(p for p in candidates[1:] if ranks[p] >= 1)
    return Choice(chosen, ranks[chosen], others)


def _ordered(
    entries: Mapping[str, Mapping[str, TensorInfo]], ranks: Mapping[str, int]
) -> list[str]:
    """Entries best first: rank, then convention, then size, then file order."""
    order = {path: i for i, path in enumerate(entries)}
    return sorted(
        entries,
        key=lambda p: (-ranks[p], _convention(p), -len(entries[p]), order[p]),
    )


def _pure_root(source: Source) -> bool:
    return "" in source.entries() and not source.extras


def choose_entry(
    source: Source,
    entry: str | None = None,
    *,
    match: Any = None,
) -> Choice:
    """The tensor dict of ``source`` holding the weights (see :mod:`torchkeep.weights.entries`)."""
    return choose(
        source.entries(), pure_root=_pure_root(source), where=source.path, entry=entry, match=match
    )


def default_entry(source: Source, entry: str | None = None) -> str:
    """The entry holding the weights when there is no model to match against."""
    return choose_entry(source, entry).entry


__all__ = [
    "BOOKKEEPING",
    "CONVENTIONAL",
    "NOT_WEIGHTS",
    "Choice",
    "choose",
    "choose_entry",
    "default_entry",
    "rank",
    "segments",
]
