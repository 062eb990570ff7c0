"""torchkeep.tools.diff: pairing names and measuring value differences."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.tools.diff import compare_values, diff, diff_states

GOLDEN = Path(__file__).parent / "data" / "golden"
NAN, INF = float("nan"), float("inf")


def test_identical_states_are_the_same() -> None:
    state = {"a": torch.randn(3, 4), "b": torch.tensor([NAN, 1.0]), "n": torch.tensor(7)}
    report = diff_states(state, {k: v.clone() for k, v in state.items()})
    assert report.same()
    assert report.count("identical") == 3
    assert not (report.added or report.removed or report.renamed)


def test_one_changed_element_is_found_and_measured() -> None:
    a = torch.arange(1.0, 101.0)
    b = a.clone()
    b[17] += 0.5
    [t] = diff_states({"w": a}, {"w": b}).tensors
    assert t.status == "different"
    assert t.mismatched == 1
    assert t.max_abs == pytest.approx(0.5)
    assert t.rel_l2 == pytest.approx(0.5 / float(a.double().norm()))
    expected_cos = float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
    assert t.cosine == pytest.approx(expected_cos)
    assert not diff_states({"w": a}, {"w": b}).same()


def test_tolerance_boundary() -> None:
    a, b = (
        torch.tensor([1.0, 2.0], dtype=torch.float64),
        torch.tensor([1.25, 2.0], dtype=torch.float64),
    )
    assert diff_states({"w": a}, {"w": b}, atol=0.25).same()
    assert not diff_states({"w": a}, {"w": b}, atol=0.2499).same()
    assert diff_states({"w": a}, {"w": b}, rtol=0.2).same()  # 0.25 <= 0.2 * 1.25
    assert not diff_states({"w": a}, {"w": b}, rtol=0.19).same()


def test_nan_and_inf_handling() -> None:
    same = compare_values(torch.tensor([NAN, INF, -INF, 1.0]), torch.tensor([NAN, INF, -INF, 1.0]))
    assert same.status == "equal" and same.mismatched == 0 and same.max_abs == 0
    one_nan = compare_values(torch.tensor([NAN, 1.0]), torch.tensor([0.0, 1.0]), atol=1e9)
    assert one_nan.status == "different" and one_nan.mismatched == 1
    inf_vs_finite = compare_values(torch.tensor([INF]), torch.tensor([1.0]), atol=1e9)
    assert inf_vs_finite.status == "different" and math.isinf(inf_vs_finite.max_abs or 0)


def test_negative_zero_is_equal_but_not_identical() -> None:
    [t] = diff_states({"w": torch.tensor([0.0])}, {"w": torch.tensor([-0.0])}).tensors
    assert t.status == "equal"
    assert diff_states({"w": torch.tensor([0.0])}, {"w": torch.tensor([-0.0])}).same()


def test_zero_tensors() -> None:
    values = compare_values(torch.zeros(3), torch.ones(3))
    assert values.rel_l2 == math.inf and values.cosine == 0.0
    assert compare_values(torch.zeros(3), -torch.zeros(3)).cosine == 1.0


def test_chunking_gives_the_same_answer() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(10_000), torch.randn(10_000)
    whole = compare_values(a, b, chunk=1 << 20)
    chunked = compare_values(a, b, chunk=333)
    assert chunked.mismatched == whole.mismatched == 10_000
    assert chunked.max_abs == pytest.approx(whole.max_abs)
    assert chunked.rel_l2 == pytest.approx(whole.rel_l2)
    assert chunked.cosine == pytest.approx(whole.cosine)


def test_shape_and_dtype_changes() -> None:
    report = diff_states(
        {"s": torch.ones(2), "d": torch.ones(2)},
        {"s": torch.ones(3), "d": torch.ones(2, dtype=torch.float16)},
    )
    by_name = {t.name_a: t for t in report.tensors}
    assert by_name["s"].status == "shape"
    assert by_name["d"].status == "equal" and by_name["d"].dtype_changed
    assert not report.same()
    assert not report.same(ignore_dtypes=True)  # the shape change remains
    only_dtype = diff_states({"d": torch.ones(2)}, {"d": torch.ones(2, dtype=torch.float16)})
    assert not only_dtype.same() and only_dtype.same(ignore_dtypes=True)


def test_added_removed_and_renamed() -> None:
    w = torch.randn(4, 4)
    report = diff_states(
        {"module.enc.w": w, "module.old": torch.randn(5), "module.moved": torch.arange(6.0)},
        {"enc.w": w.clone(), "new": torch.randn(7), "relocated": torch.arange(6.0)},
    )
    renamed = {(r.name_a, r.name_b, r.reason) for r in report.renamed}
    assert ("module.enc.w", "enc.w", "prefix") in renamed
    assert ("module.moved", "relocated", "values") in renamed
    assert report.removed == ("module.old",)
    assert report.added == ("new",)
    assert not report.same(ignore_renames=True)


def test_ambiguous_value_matches_are_not_guessed() -> None:
    report = diff_states(
        {"a": torch.zeros(3), "b": torch.zeros(3)}, {"c": torch.zeros(3), "d": torch.zeros(3)}
    )
    assert report.renamed == ()
    assert sorted(report.removed) == ["a", "b"] and sorted(report.added) == ["c", "d"]


def test_complex_values() -> None:
    a = torch.tensor([1 + 1j, 2 - 1j])
    assert diff_states({"c": a}, {"c": a.clone()}).same()
    [t] = diff_states({"c": a}, {"c": a * 1j}).tensors
    assert t.status == "different"


def test_files_across_formats_are_identical(tmp_path: Path) -> None:
    for name in ("net_state_dict_legacy.pt", "net_sharded", "net_sharded_bin", "cuda_saved.pt"):
        report = diff(GOLDEN / "net.safetensors", GOLDEN / name)
        assert report.same(), (name, report.summary())
    report = diff(GOLDEN / "net_state_dict.pt", GOLDEN / "net_lightning.ckpt")
    assert report.entry_b == "state_dict"
    assert report.same(ignore_renames=True) and not report.same()


def test_progress_reaches_the_total() -> None:
    seen: list[tuple[int, int]] = []
    diff(
        GOLDEN / "net.safetensors",
        GOLDEN / "net_sharded",
        progress=lambda done, total: seen.append((done, total)),
    )
    assert len(seen) == 9
    assert seen[-1] == (2 * 724, 2 * 724)


def test_flipped_bit_in_golden_file() -> None:
    report = diff(GOLDEN / "net.safetensors", GOLDEN / "flipped_data.safetensors")
    changed = [t for t in report.tensors if t.differs]
    assert [t.name_a for t in changed] == ["conv.weight"]
    assert changed[0].max_abs == pytest.approx(abs(-0.17929497361183167 - -0.24179497361183167))


def test_entry_option_applies_to_both(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}}, path)
    assert diff(path, path, entry="ema").entry_a == "ema"
    tk.save({"w": torch.zeros(2)}, tmp_path / "z.safetensors")
    with pytest.raises(KeyError, match="no tensor dict"):
        diff(path, tmp_path / "z.safetensors", entry="ema")
