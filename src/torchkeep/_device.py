"""Refuse a device this machine lacks before any file is opened or any tensor moved.

torch reports a missing device in a different way per backend: ``RuntimeError`` for an
unknown name, ``AssertionError`` for CUDA or XPU missing from the build, ``NotImplementedError``
or ``ModuleNotFoundError`` for others. Every verb that takes ``device=`` checks it here first,
so each of those becomes one :class:`~torchkeep.errors.DeviceError` that names the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from torchkeep.errors import DeviceError, InvalidStateError

# How the message spells each backend.
_NAMES = {"cuda": "CUDA", "mps": "MPS", "xpu": "XPU", "mtia": "MTIA"}


def _count(kind: str) -> int:
    """How many devices of this kind are usable here (0 when the backend is absent)."""
    module = getattr(torch, kind, None)
    available = getattr(module, "is_available", None)
    count = getattr(module, "device_count", None)
    if callable(available) and callable(count):
        try:
            return int(count()) if available() else 0
        except Exception:  # a backend that is built but broken is as good as absent
            return 0
    # Backends without a torch.<kind> module (plugins, ipu, hpu, xla): try one empty tensor.
    try:
        torch.empty(0, device=kind)
    except Exception:
        return 0
    return 1 << 30  # present; its device count is not known, so no index is refused


def check_device(device: str | torch.device | int | None, what: str) -> torch.device:
    """The device named by ``device``, refused with a clear error when it is not usable here.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"meta"``, a
            ``torch.device``, or ``None`` (the CPU).
        what: what was to go there, for the message: ``"load 'model.pt'"``.

    Returns:
        The parsed ``torch.device``.

    Raises:
        DeviceError: the name is not a device, or this machine has no such device.
        InvalidStateError: ``device`` is not a string, an int or a ``torch.device``.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise InvalidStateError(
            f"cannot {what}: device= takes a string such as 'cpu' or 'cuda:0' or a "
            f"torch.device, got a {type(device).__name__}"
        )
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        if isinstance(device, int):
            raise DeviceError(
                f"cannot {what} onto device {device}: an index alone names an accelerator, "
                "and this machine has none available; use device='cpu'"
            ) from exc
        raise DeviceError(
            f"cannot {what}: {device!r} is not a device torch knows; write 'cpu', 'cuda', "
            f"'cuda:0', 'mps' or 'meta' ({exc})"
        ) from exc
    if parsed.type in ("cpu", "meta"):
        return parsed
    name = _NAMES.get(parsed.type, parsed.type)
    count = _count(parsed.type)
    if count == 0:
        raise DeviceError(
            f"cannot {what} onto {str(parsed)!r}: {name} is not available on this machine; "
            "use device='cpu' (or leave device= out)"
        )
    if parsed.index is not None and parsed.index >= count:
        have = ", ".join(f"{parsed.type}:{i}" for i in range(count))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if parsed.type == "cuda" else None
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise DeviceError(
            f"cannot {what} onto {str(parsed)!r}: this machine has {count} {name} "
            f"device{'s' if count != 1 else ''}{hint}; use one of {have}, or 'cpu'"
        )
    return parsed


def check_devices(device: str | torch.device | Mapping[str, str] | None, what: str) -> None:
    """:func:`check_device` for a ``device=`` that may also be a location map.

    A map such as ``{"cuda:1": "cuda:0"}`` is checked by its targets: its keys name where
    tensors were saved, which need not exist here.
    """
    if isinstance(device, Mapping):
        for target in device.values():
            check_device(target, what)
    else:
        check_device(device, what)


__all__ = ["check_device", "check_devices"]
