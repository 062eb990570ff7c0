"""torchkeep.tools.stats: tensor statistics in bounded memory."""

from __future__ import annotations

import pytest
import torch

from torchkeep.tools.stats import tensor_stats

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_matches_torch_for_any_chunk_size(chunk: int) -> None:
    torch.manual_seed(0)
    values = torch.randn(1000) * 3 + 5
    stats = tensor_stats("w", values, chunk=chunk)
    as_double = values.double()
    assert stats.min == pytest.approx(float(as_double.min()))
    assert stats.max == pytest.approx(float(as_double.max()))
    assert stats.mean == pytest.approx(float(as_double.mean()))
    assert stats.std == pytest.approx(float(as_double.std()))
    assert (stats.nan, stats.inf, stats.zeros, stats.numel) == (0, 0, 0, 1000)


def test_non_finite_values_are_counted_not_averaged() -> None:
    stats = tensor_stats("w", torch.tensor([1.0, NAN, INF, -INF, 3.0, 0.0]), chunk=2)
    assert (stats.nan, stats.inf, stats.zeros) == (1, 2, 1)
    assert (stats.min, stats.max) == (0.0, 3.0)
    assert stats.mean == pytest.approx(4 / 3)


def test_undefined_values_are_none() -> None:
    all_nan = tensor_stats("w", torch.full((3,), NAN))
    assert all_nan.min is None and all_nan.mean is None and all_nan.nan == 3
    single = tensor_stats("w", torch.tensor(2))
    assert single.mean == 2.0 and single.std is None
    empty = tensor_stats("w", torch.zeros(0))
    assert empty.numel == 0 and empty.min is None


def test_integer_bool_and_half_dtypes() -> None:
    assert tensor_stats("i", torch.tensor([1, 2, 3], dtype=torch.int64)).mean == 2.0
    assert tensor_stats("b", torch.tensor([True, False, True])).mean == pytest.approx(2 / 3)
    half = tensor_stats("h", torch.tensor([0.5, 1.5], dtype=torch.bfloat16))
    assert (half.min, half.max) == (0.5, 1.5)


def test_complex_counts_parts_and_leaves_moments_undefined() -> None:
    stats = tensor_stats("c", torch.tensor([complex(1, NAN), complex(0, 2)]))
    assert stats.nan == 1 and stats.zeros == 1
    assert stats.mean is None
