"""Fields shared by torchkeep's commit documents (native manifests, distributed markers)."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from torchkeep.errors import InvalidStateError
from torchkeep.formats.tree import Flattener


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def number(name: str, value: object) -> float | int:
    # A loss tensor or numpy scalar passed as a metric is what people mean by its number.
    size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", 0)
    if isinstance(value, torch.Tensor | np.ndarray | np.generic) and size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidStateError(
            f"metric {name!r} must be a number (an int, a float or a one-element tensor), got "
            f"a {type(value).__name__}; put other values in metadata="
        )
    return value


def plain_json(value: object, what: str) -> Any:
    flattener = Flattener()
    node = flattener.encode(value, what)
    if flattener.tensors:
        raise InvalidStateError(
            f"{what} holds a tensor at {next(iter(flattener.tensors))!r}; {what} is stored as "
            "JSON: put tensors in the state instead"
        )
    return node


def manifest_header(
    format: str,
    version: int,
    step: int | None,
    metrics: Mapping[str, object] | None,
    metadata: Mapping[str, object] | None,
) -> dict[str, Any]:
    """The fields every torchkeep commit document opens with (native manifest, DCP marker)."""
    return {
        "format": format,
        "version": version,
        "id": uuid.uuid4().hex,
        "torch_version": str(torch.__version__),
        "created": now(),
        "step": step,
        "metrics": {k: plain_json(number(k, v), "metrics") for k, v in (metrics or {}).items()},
        "metadata": plain_json(dict(metadata or {}), "metadata"),
    }
