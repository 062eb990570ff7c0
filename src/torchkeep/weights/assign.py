"""Low-memory loading: replace a model's tensors with the ones read from the file.

A model built on the meta device has shapes and dtypes but no memory. Reading each tensor from
the file and *assigning* it (``load_state_dict(assign=True)``) instead of copying it into a
preallocated parameter means the weights exist once, never twice: no random initialisation,
no second copy in a state dict. Tied weights stay tied.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from torchkeep._tensors import FLOAT4
from torchkeep.errors import InvalidArgumentError, InvalidStateError, TorchkeepWarning

if TYPE_CHECKING:
    from torchkeep.formats._base import Source


def check_floating(dtype: object, what: str) -> None:
    """Refuse a ``dtype=`` that is not a floating-point (or complex) ``torch.dtype``.

    Raises:
        InvalidStateError: ``dtype`` is not a ``torch.dtype`` (``"float16"``).
        InvalidArgumentError: it is an integer or boolean dtype.
    """
    if not isinstance(dtype, torch.dtype):
        raise InvalidStateError(
            f"{what}: dtype= takes a torch.dtype such as torch.float16, got a "
            f"{type(dtype).__name__} {dtype!r}"
        )
    if not dtype.is_floating_point and not dtype.is_complex:
        raise InvalidArgumentError(
            f"{what}: dtype= casts floating-point weights, so it must be a floating-point "
            f"dtype (torch.float16, torch.bfloat16, ...), got {dtype}; integer buffers keep "
            "their own dtype"
        )


def cast_floating(state: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``state`` with floating-point tensors cast to ``dtype`` (shared tensors stay shared;
    other values as they are)."""
    check_floating(dtype, "load_state_dict")
    done: dict[int, torch.Tensor] = {}
    out: dict[str, Any] = {}
    for name, tensor in state.items():
        # Packed float4 (two values per element) has no conversion; it is kept as it is.
        if (
            not isinstance(tensor, torch.Tensor)
            or not tensor.is_floating_point()
            or tensor.dtype == FLOAT4
        ):
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
    # What load_state_dict(assign=True) does per name, without running the load machinery of
    # modules that customise it (those are loaded through it separately).
    for name, tensor in state.items():
        module, leaf = _owner(model, name)
        old = module._parameters.get(leaf)
        if leaf in module._parameters and old is not None:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            _set(model, name, tensor)
    for dst, first in tied:
        _set(model, dst, _get(model, first))


def warn_meta_left(model: torch.nn.Module) -> None:
    """Warn about tensors a low-memory load left on the meta device (without data)."""
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


def retie(model: torch.nn.Module, name: str, via: str) -> None:
    """Point ``name`` at the tensor ``via`` holds (a tie that assignment replaced)."""
    _set(model, name, _get(model, via))
