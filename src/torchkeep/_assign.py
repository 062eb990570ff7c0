"""Low-memory loading: replace a model's tensors with the ones read from the file.

A model built on the meta device has shapes and dtypes but no memory. Reading each tensor from
the file and *assigning* it (``load_state_dict(assign=True)``) instead of copying it into a
preallocated parameter means the weights exist once, never twice: no random initialisation,
no second copy in a state dict. Tied weights stay tied.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from torchkeep.errors import TorchkeepWarning

if TYPE_CHECKING:
    from torchkeep.formats._base import Source


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with floating-point tensors cast to ``dtype`` (shared tensors stay shared)."""
    if not dtype.is_floating_point and not dtype.is_complex:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    done: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = id(tensor)
        if key not in done:
            done[key] = tensor.to(dtype)
        out[name] = done[key]
    return out


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    # A view would keep the rest of its storage (another tensor's bytes) alive in the model.
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def assign_into(
    model: torch.nn.Module,
    source: Source,
    entry: str,
    fits: Sequence[tuple[str, str]],
    dest: Mapping[str, torch.Tensor],
) -> None:
    """Read each ``(model name, file name)`` pair of ``fits`` and assign it into ``model``.

    Tensors keep the destination's dtype (cast as read when the file's differs) and come on
    the device the source reads to. Names that were one tensor in the model (tied weights)
    are read once and point at the same new parameter afterwards.
    """
    first_of: dict[int, str] = {}
    tied: list[tuple[str, str]] = []
    state: dict[str, torch.Tensor] = {}
    for dst, src in fits:
        target = dest[dst]
        key = id(target)
        if key in first_of:
            tied.append((dst, first_of[key]))
            continue
        first_of[key] = dst
        tensor = _own_storage(source.get(entry, src))
        if tensor.dtype != target.dtype:
            tensor = tensor.to(target.dtype)
        state[dst] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    for dst, first in tied:
        _set(model, dst, _get(model, first))
    left = [
        name
        for name, value in [*model.named_parameters(), *model.named_buffers()]
        if value.device.type == "meta"
    ]
    if left:
        shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
        warnings.warn(
            f"after loading, {len(left)} tensors of the model are still on the meta device "
            f"(no data): {shown}. They are not in the file (non-persistent buffers are "
            "computed in the constructor): create them with model.to_empty(...) and set "
            "them, or build those modules outside the meta device",
            TorchkeepWarning,
            stacklevel=3,
        )


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf


def _get(model: torch.nn.Module, name: str) -> torch.Tensor:
    module, leaf = _owner(model, name)
    value: torch.Tensor | None = module._parameters.get(leaf)
    if value is None:
        value = module._buffers[leaf]
    assert value is not None
    return value


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module, leaf = _owner(model, name)
    if leaf in module._parameters:
        module._parameters[leaf] = value  # type: ignore[assignment]
    else:
        module._buffers[leaf] = value
