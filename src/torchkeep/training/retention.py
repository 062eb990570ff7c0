"""Which checkpoints a :class:`~torchkeep.training.manager.CheckpointManager` keeps.

A policy is a small frozen value that, given every committed checkpoint, names the steps it
wants kept; a checkpoint survives when any policy of an :class:`AnyOf` keeps it. The manager
applies the policy only after a successful commit and always keeps the newest checkpoint.

>>> policy = AnyOf(KeepLast(3), KeepBest("val_loss", "min"), KeepEvery(10_000))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from torchkeep.errors import InvalidArgumentError, InvalidStateError

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint, as the manager finds it on disk.

    Attributes:
        step: its training step.
        path: its folder.
        metrics: the metrics saved with it (read back from its ``checkpoint.json``).
    """

    step: int
    path: Path | str
    metrics: Mapping[str, float] = field(default_factory=dict)


class RetentionPolicy(Protocol):
    """Anything that picks, from all committed checkpoints, the steps to keep."""

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The steps of ``checkpoints`` this policy wants kept."""
        ...


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")


def _metric(checkpoint: Checkpoint, metric: str) -> float | None:
    value = checkpoint.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None  # a NaN loss is never "best"
    return float(value)


def ranked(checkpoints: Sequence[Checkpoint], metric: str, mode: Mode) -> list[Checkpoint]:
    """Checkpoints that have ``metric``, best first; equal values rank the newer first."""
    if mode not in ("min", "max"):
        raise InvalidArgumentError(
            f"mode must be 'min' (lower {metric} is better) or 'max', got {mode!r}"
        )
    scored = [(value, c) for c in checkpoints if (value := _metric(c, metric)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda item: (sign * item[0], -item[1].step))
    return [c for _, c in scored]


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` checkpoints with the highest steps."""

    n: int

    def __post_init__(self) -> None:
        _positive("KeepLast n", self.n)

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The ``n`` highest steps."""
        return set(sorted(c.step for c in checkpoints)[-self.n :])


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``n`` checkpoints with the best value of ``metric``.

    Checkpoints saved without the metric (or with NaN) are never chosen by this policy.
    """

    metric: str
    mode: Mode = "min"
    n: int = 1

    def __post_init__(self) -> None:
        _positive("KeepBest n", self.n)
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(
                f"KeepBest mode must be 'min' (lower {self.metric} is better) or 'max', "
                f"got {self.mode!r}"
            )

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The steps of the ``n`` best checkpoints."""
        return {c.step for c in ranked(checkpoints, self.metric, self.mode)[: self.n]}


@dataclass(frozen=True)
class KeepEvery:
    """Keep every checkpoint whose step is a multiple of ``steps`` (milestones)."""

    steps: int

    def __post_init__(self) -> None:
        _positive("KeepEvery steps", self.steps)

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The steps divisible by ``steps``."""
        return {c.step for c in checkpoints if c.step % self.steps == 0}


@dataclass(frozen=True, init=False)
class AnyOf:
    """Keep a checkpoint when any of ``policies`` keeps it."""

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy) -> None:
        if not policies:
            raise InvalidArgumentError(
                "AnyOf needs at least one policy: AnyOf(KeepLast(3), KeepEvery(1000))"
            )
        for policy in policies:
            if not callable(getattr(policy, "keep", None)):
                raise InvalidStateError(
                    "AnyOf takes retention policies (KeepLast, KeepBest, KeepEvery, ...), "
                    f"got a {type(policy).__name__}"
                )
        object.__setattr__(self, "policies", tuple(policies))

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The union of what every policy keeps."""
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.keep(checkpoints)
        return kept


@dataclass(frozen=True)
class KeepAll:
    """Keep everything (the manager's policy when none is given)."""

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """Every step."""
        return {c.step for c in checkpoints}


def to_delete(
    policy: RetentionPolicy, checkpoints: Sequence[Checkpoint], protect: set[int]
) -> list[Checkpoint]:
    """The checkpoints ``policy`` lets go, never those in ``protect`` nor the newest one."""
    if not checkpoints:
        return []
    kept = policy.keep(checkpoints) | protect | {max(c.step for c in checkpoints)}
    return [c for c in checkpoints if c.step not in kept]


__all__ = [
    "AnyOf",
    "Checkpoint",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "RetentionPolicy",
    "ranked",
    "to_delete",
]
