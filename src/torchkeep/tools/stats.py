"""Summary statistics of a tensor's values, computed in bounded memory.

A tensor is read in chunks of at most ``CHUNK`` elements, each converted to float64, so the
statistics of a multi-gigabyte tensor cost a few megabytes beyond the tensor itself. Means and
variances are merged across chunks with Chan's parallel formula, which stays accurate where a
running sum of squares would cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorStats:
    """The values of one tensor, summarised.

    ``min``, ``max``, ``mean`` and ``std`` cover the finite values only; NaN and infinite
    values are counted instead. ``std`` is the sample standard deviation (``torch.std``'s
    default, correction 1). Each is ``None`` where it is undefined: no finite values, a
    single value (``std``), or a complex dtype. For complex tensors the counts are over the
    real and imaginary parts.

    Attributes:
        name: the tensor's name.
        numel: how many elements it holds.
        min: smallest finite value.
        max: largest finite value.
        mean: mean of the finite values.
        std: sample standard deviation of the finite values.
        nan: how many elements are NaN.
        inf: how many elements are +inf or -inf.
        zeros: how many elements are exactly zero.
    """

    name: str
    numel: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    nan: int
    inf: int
    zeros: int


class _Moments:
    """Count, mean and sum of squared deviations of the values seen so far."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.low = math.inf
        self.high = -math.inf

    def add(self, values: torch.Tensor) -> None:
        count = values.numel()
        if count == 0:
            return
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))


def tensor_stats(name: str, tensor: torch.Tensor, *, chunk: int = CHUNK) -> TensorStats:
    """Summarise ``tensor``'s values (any dtype, any device) without copying it whole.

    Args:
        name: the name to report.
        tensor: the values.
        chunk: most elements converted to float64 at a time.

    Returns:
        A :class:`TensorStats`.

    Example:
        >>> tensor_stats("w", torch.tensor([1.0, float("nan"), 3.0])).mean
        2.0
    """
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
        complex_values = True
    else:
        complex_values = False
    moments = _Moments()
    nan = inf = zeros = 0
    for start in range(0, flat.numel(), chunk):
        values = flat[start : start + chunk].to(torch.float64)
        finite = torch.isfinite(values)
        nan += int(torch.isnan(values).sum())
        inf += int(torch.isinf(values).sum())
        zeros += int((values == 0).sum())
        moments.add(values if bool(finite.all()) else values[finite])
    defined = moments.count > 0 and not complex_values
    std = math.sqrt(moments.m2 / (moments.count - 1)) if defined and moments.count > 1 else None
    return TensorStats(
        name=name,
        numel=tensor.numel(),
        min=moments.low if defined else None,
        max=moments.high if defined else None,
        mean=moments.mean if defined else None,
        std=std,
        nan=nan,
        inf=inf,
        zeros=zeros,
    )
