"""What a training checkpoint holds besides weights: optimizer, scheduler, epoch, loss, args.

:func:`torchkeep.inspect` summarizes a file's other top-level values with it, so torchkeep's
own ``.pt`` checkpoints, native checkpoint folders and any tutorial-style checkpoint dict are
described the same way: step, epoch, metrics, optimizer and scheduler hyper-parameters, args.

Optimizer and scheduler state dicts do not record their class, so the class is recognised
from the hyperparameter names torch's optimizers and schedulers put in them (``betas`` and
``amsgrad``: Adam; ``nesterov``: SGD; ``T_max``: CosineAnnealingLR, ...). Nothing here reads
tensor data: files are opened on the meta device, so values stored as tensors (Adam's ``step``)
are reported as unavailable rather than read.
"""

from __future__ import annotations

import argparse
import itertools
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep.weights.entries import BOOKKEEPING

# Optimizer param_group keys torch adds for its implementation, not training hyperparameters.
_IMPLEMENTATION_KEYS = frozenset(
    {"params", "foreach", "fused", "differentiable", "capturable", "param_names"}
)
_MAX_TEXT = 80


@dataclass(frozen=True)
class OptimizerSummary:
    """One optimizer state dict.

    Attributes:
        where: its key path in the checkpoint (``optimizer_state_dict``, ``optimizer_states[0]``).
        type: the optimizer class recognised from its hyperparameters (``"Adam"``, or
            ``"unknown"``).
        groups: how many parameter groups it has.
        params: how many parameters its groups cover.
        with_state: how many parameters have state (momentum buffers, moments, ...).
        hyperparameters: each hyperparameter as text; values that differ between groups are
            joined with `` | ``.
    """

    where: str
    type: str
    groups: int
    params: int
    with_state: int
    hyperparameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerSummary:
    """One learning-rate scheduler state dict.

    Attributes:
        where: its key path in the checkpoint.
        type: the scheduler class recognised from its settings, or ``"unknown"``.
        settings: its public settings and counters as text (``last_epoch``, ``step_size``, ...).
    """

    where: str
    type: str
    settings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSummary:
    """Everything in a checkpoint dict that is not a tensor dict.

    Attributes:
        values: plain values by key path (``epoch``, ``loss``, ``global_step``, ...).
        metrics: the metrics torchkeep recorded with the checkpoint (``val_loss``, ...).
        settings: argument and hyperparameter collections (``args``, ``hyper_parameters``),
            each as ``{name: text}``.
        optimizers: optimizer state dicts found.
        schedulers: scheduler state dicts found.
    """

    values: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    optimizers: tuple[OptimizerSummary, ...] = ()
    schedulers: tuple[SchedulerSummary, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.values or self.metrics or self.settings or self.optimizers or self.schedulers
        )


def text(value: Any) -> str:
    """A short, readable rendering of one value (tensors by shape unless they hold a scalar)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.device.type != "meta":
            return text(value.item())
        return f"tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, float):
        rendered = f"{value:.6g}"
    elif isinstance(value, Mapping):
        rendered = f"dict of {len(value)}" if value else "{}"
    elif isinstance(value, (list, tuple)) and len(value) > 6:
        rendered = f"{type(value).__name__} of {len(value)}"
    elif isinstance(value, (list, tuple)):
        inner = ", ".join(text(v) for v in value)
        rendered = f"[{inner}]" if isinstance(value, list) else f"({inner})"
    else:
        rendered = str(value)
    return rendered if len(rendered) <= _MAX_TEXT else rendered[: _MAX_TEXT - 3] + "..."


def _is_optimizer(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def _is_scheduler(value: Any) -> bool:
    return isinstance(value, Mapping) and ("last_epoch" in value or "base_lrs" in value)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def _optimizer_type(groups: Sequence[Mapping[str, Any]], state: Mapping[Any, Any]) -> str:
    keys = set(groups[0]) if groups else set()
    state_keys: set[str] = set()
    for value in state.values():
        if isinstance(value, Mapping):
            state_keys |= {str(k) for k in value}
    decoupled = bool(groups and groups[0].get("decoupled_weight_decay"))
    rules: tuple[tuple[bool, str], ...] = (
        ("history_size" in keys, "LBFGS"),
        ("momentum_decay" in keys, "NAdam"),
        ("beta2_decay" in keys, "Adafactor"),
        ("nesterov" in keys or "dampening" in keys, "SGD"),
        ("centered" in keys, "RMSprop"),
        ("lambd" in keys and "t0" in keys, "ASGD"),
        ("lr_decay" in keys or "initial_accumulator_value" in keys, "Adagrad"),
        ("rho" in keys, "Adadelta"),
        ("etas" in keys, "Rprop"),
        ("exp_inf" in state_keys, "Adamax"),
        ("amsgrad" in keys and decoupled, "AdamW"),
        ("amsgrad" in keys and "decoupled_weight_decay" in keys, "Adam"),
        ("amsgrad" in keys, "Adam or AdamW"),
        ("decoupled_weight_decay" in keys and "betas" in keys, "RAdam"),
        ("betas" in keys and "weight_decay" not in keys, "SparseAdam"),
    )
    return next((name for matched, name in rules if matched), "unknown")


def _optimizer(where: str, value: Mapping[str, Any]) -> OptimizerSummary:
    raw_groups = value.get("param_groups")
    groups = (
        [g for g in raw_groups if isinstance(g, Mapping)]
        if isinstance(raw_groups, (list, tuple))
        else []
    )
    raw_state = value.get("state")
    state: Mapping[Any, Any] = raw_state if isinstance(raw_state, Mapping) else {}
    hyper: dict[str, str] = {}
    for group in groups:
        for key in group:
            if key not in _IMPLEMENTATION_KEYS and key not in hyper:
                rendered = [text(g.get(key)) for g in groups]
                distinct = list(dict.fromkeys(rendered))
                hyper[str(key)] = distinct[0] if len(distinct) == 1 else " | ".join(rendered)
    if hyper.get("maximize") == "False":
        del hyper["maximize"]
    params = sum(len(g.get("params", ())) for g in groups)
    return OptimizerSummary(
        where, _optimizer_type(groups, state), len(groups), params, len(state), hyper
    )


def _scheduler_type(keys: set[str]) -> str:
    rules: tuple[tuple[str, str], ...] = (
        ("_schedulers", "SequentialLR or ChainedScheduler"),
        ("patience", "ReduceLROnPlateau"),
        ("_schedule_phases", "OneCycleLR"),
        ("step_ratio", "CyclicLR"),
        ("T_0", "CosineAnnealingWarmRestarts"),
        ("T_max", "CosineAnnealingLR"),
        ("milestones", "MultiStepLR"),
        ("step_size", "StepLR"),
        ("start_factor", "LinearLR"),
        ("lr_lambdas", "LambdaLR or MultiplicativeLR"),
        ("power", "PolynomialLR"),
        ("factor", "ConstantLR"),
        ("gamma", "ExponentialLR"),
    )
    return next((name for key, name in rules if key in keys), "unknown")


def _scheduler(where: str, value: Mapping[str, Any]) -> SchedulerSummary:
    settings = {
        str(k): text(v) for k, v in value.items() if not str(k).startswith("_") and v is not None
    }
    if "_last_lr" in value:
        settings["last_lr"] = text(value["_last_lr"])
    return SchedulerSummary(where, _scheduler_type({str(k) for k in value}), settings)


def _settings(value: Any) -> dict[str, str] | None:
    """``{name: text}`` for an argparse Namespace or a flat dict of plain values."""
    if isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
        value = vars(value)
    if not isinstance(value, Mapping) or not value:
        return None
    if any(isinstance(v, (Mapping, torch.Tensor)) for v in value.values()):
        return None
    return _first(value, lambda k, v: (str(k), text(v)))


# A summary is for reading: past this many keys of one mapping, the rest are counted, not shown
# (a file can hold a mapping of millions of entries, or the same one under many keys).
_MAX_ITEMS = 50


def _first(
    value: Mapping[Any, Any], render: Callable[[Any, Any], tuple[str, str]]
) -> dict[str, str]:
    shown = dict(render(k, v) for k, v in itertools.islice(value.items(), _MAX_ITEMS))
    if len(value) > _MAX_ITEMS:
        shown["..."] = f"{len(value) - _MAX_ITEMS} more"
    return shown


def bookkeeping(extras: Mapping[str, Any]) -> dict[str, str]:
    """torchkeep's own record in a checkpoint (``__torchkeep__``: format, version, creation
    time, torch version, RNG states, ...), one short text per key (``__torchkeep__.created``)."""
    record = extras.get(BOOKKEEPING)
    if not isinstance(record, Mapping):
        return {} if record is None else {BOOKKEEPING: text(record)}
    shown = _first(record, lambda k, v: (f"{BOOKKEEPING}.{k}", _flat(v)))
    return {key: value for key, value in shown.items() if value != "None"}


def _flat(value: Any) -> str:
    """A mapping of plain values as ``k=v`` pairs (RNG states and the like by size only)."""
    found = _settings(value)
    if found is None or any(len(v) > _MAX_TEXT // 2 for v in found.values()):
        return text(value)
    return "  ".join(f"{k}={v}" for k, v in found.items())


def summarize(extras: Mapping[str, Any]) -> TrainingSummary:
    """Recognise the optimizer, scheduler, counters and settings among a file's top-level values.

    torchkeep's own record (``__torchkeep__``) contributes its metrics and step; the rest of it
    is :func:`bookkeeping`, not part of the summary.

    Args:
        extras: a source's non-tensor top-level values (``Source.extras``), raw.

    Returns:
        A :class:`TrainingSummary`; falsy when there is nothing besides tensor dicts.
    """
    values: dict[str, str] = {}
    settings: dict[str, dict[str, str]] = {}
    optimizers: list[OptimizerSummary] = []
    schedulers: list[SchedulerSummary] = []

    def visit(where: str, value: Any, depth: int) -> None:
        if _is_optimizer(value):
            optimizers.append(_optimizer(where, value))
        elif _is_scheduler(value):
            schedulers.append(_scheduler(where, value))
        elif (
            isinstance(value, (list, tuple))
            and value
            and all(_is_optimizer(v) or _is_scheduler(v) for v in value)
        ):
            for i, item in enumerate(value):
                visit(f"{where}[{i}]", item, depth + 1)
        elif _is_tensor_dict(value):
            return
        elif (found := _settings(value)) is not None:
            settings[where] = found
        elif isinstance(value, Mapping) and value and depth < 1:
            for key, item in itertools.islice(value.items(), _MAX_ITEMS):
                visit(f"{where}.{key}", item, depth + 1)
            if len(value) > _MAX_ITEMS:
                values[f"{where}...."] = f"{len(value) - _MAX_ITEMS} more"
        else:
            values[where] = text(value)

    record = extras.get(BOOKKEEPING)
    record = record if isinstance(record, Mapping) else {}
    if record.get("step") is not None:
        values["step"] = text(record["step"])
    for key, value in extras.items():
        if key != BOOKKEEPING:
            visit(str(key), value, 0)
    raw_metrics = record.get("metrics")
    metrics = (
        _first(raw_metrics, lambda k, v: (str(k), text(v)))
        if isinstance(raw_metrics, Mapping)
        else {}
    )
    return TrainingSummary(values, metrics, settings, tuple(optimizers), tuple(schedulers))
