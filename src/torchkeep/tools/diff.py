"""Compare two checkpoints tensor by tensor: names, shapes, dtypes and values.

Names are paired first by :func:`torchkeep.weights.keys.plan_keys` (so ``module.fc.weight`` pairs
with ``fc.weight``), then tensors left over on both sides are paired when their bytes are
identical under a different name. Values are compared in float64, one chunk at a time, so two
multi-gigabyte files are compared holding one tensor of each at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from rich.text import Text

from torchkeep._facts import TensorInfo
from torchkeep._progress import ProgressOption, reporter
from torchkeep._tensors import dtype_name, to_cpu_contiguous, xxh3
from torchkeep.formats._base import OpenOptions, Source
from torchkeep.formats.registry import open_source
from torchkeep.storage.locate import needs_staging, readable
from torchkeep.weights.entries import default_entry
from torchkeep.weights.keys import plan_keys
from torchkeep.weights.render import Block, Columns, Line, Rendered, number, shape_text

Status = Literal["identical", "equal", "different", "shape"]
Progress = Callable[[int, int], None]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor of A compares with its counterpart in B.

    Attributes:
        name_a: its name in A.
        name_b: its name in B.
        shape_a: its shape in A.
        shape_b: its shape in B.
        dtype_a: its dtype in A (``float32``).
        dtype_b: its dtype in B.
        status: ``"identical"`` (same dtype, same bytes), ``"equal"`` (every value within
            ``atol + rtol * |b|``, NaN matching NaN), ``"different"`` or ``"shape"`` (shapes
            differ, values not compared).
        max_abs: largest absolute difference over positions where neither side is NaN.
        rel_l2: ``||a - b|| / ||a||`` over finite positions (``inf`` when ``a`` is all zeros
            and ``b`` is not).
        cosine: cosine similarity of the finite values (1.0 when both are all zeros).
        mismatched: elements outside the tolerance, NaN against a number included.
    """

    name_a: str
    name_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    status: Status
    max_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    mismatched: int = 0

    @property
    def dtype_changed(self) -> bool:
        """Whether the dtypes differ."""
        return self.dtype_a != self.dtype_b

    @property
    def differs(self) -> bool:
        """Whether shape, dtype or values differ beyond the tolerance."""
        return self.status in ("different", "shape") or self.dtype_changed


@dataclass(frozen=True)
class Rename:
    """A tensor found under a different name in B.

    Attributes:
        name_a: its name in A.
        name_b: its name in B.
        reason: ``"prefix"`` (the names agree once wrapper prefixes such as ``module.`` are
            removed) or ``"values"`` (same shape, dtype and bytes under another name).
    """

    name_a: str
    name_b: str
    reason: Literal["prefix", "values"]


@dataclass(frozen=True, repr=False)
class DiffReport(Rendered):
    """The outcome of comparing checkpoint A with checkpoint B.

    ``print(report)`` shows what ``torchkeep diff`` shows; in a notebook it displays as a
    table; ``repr(report)`` is one line.

    Attributes:
        path_a: A's path (or ``"a"`` for in-memory states).
        path_b: B's path.
        entry_a: the tensor dict compared in A (``""``: the file's root).
        entry_b: the tensor dict compared in B.
        added: names only B holds.
        removed: names only A holds.
        renamed: tensors paired under different names.
        tensors: every pair compared, in A's order.
        atol: absolute tolerance used.
        rtol: relative tolerance used.
    """

    path_a: str
    path_b: str
    entry_a: str
    entry_b: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    renamed: tuple[Rename, ...] = ()
    tensors: tuple[TensorDiff, ...] = field(default_factory=tuple)
    atol: float = 0.0
    rtol: float = 0.0

    def count(self, status: Status) -> int:
        """How many compared pairs have ``status``."""
        return sum(1 for t in self.tensors if t.status == status)

    @property
    def dtype_changed(self) -> tuple[TensorDiff, ...]:
        """Pairs whose dtypes differ."""
        return tuple(t for t in self.tensors if t.dtype_changed)

    def same(self, *, ignore_renames: bool = False, ignore_dtypes: bool = False) -> bool:
        """True when no tensor was added, removed, reshaped, recast or changed in value.

        Args:
            ignore_renames: count tensors found under another name as the same.
            ignore_dtypes: count a dtype change as the same when the values are equal
                within the tolerance.
        """
        if self.added or self.removed or (self.renamed and not ignore_renames):
            return False
        if ignore_dtypes:
            return all(t.status in ("identical", "equal") for t in self.tensors)
        return not any(t.differs for t in self.tensors)

    def summary(self) -> str:
        """One line of counts."""
        parts = [f"{self.count('identical')} identical"]
        for label, value in (
            ("equal within tolerance", self.count("equal")),
            ("different", self.count("different")),
            ("shape changed", self.count("shape")),
            ("dtype changed", len(self.dtype_changed)),
            ("renamed", len(self.renamed)),
            ("added", len(self.added)),
            ("removed", len(self.removed)),
        ):
            if value:
                parts.append(f"{value} {label}")
        return ", ".join(parts)

    def blocks(self) -> list[Block]:
        """The description ``str()``, ``rich.print()`` and notebooks show."""
        return self.view()

    def view(
        self, *, show_all: bool = False, ignore_renames: bool = False, ignore_dtypes: bool = False
    ) -> list[Block]:
        """The description, as ``torchkeep diff`` prints it.

        Args:
            show_all: list identical tensors too.
            ignore_renames: the verdict counts renamed tensors as the same.
            ignore_dtypes: the verdict counts dtype changes as the same.
        """
        rows = _rows(self, show_all)
        same = self.same(ignore_renames=ignore_renames, ignore_dtypes=ignore_dtypes)
        exact = not self.renamed and all(
            t.status == "identical" and not t.dtype_changed for t in self.tensors
        )
        word = ("identical" if exact else "same") if same else "different"
        verdict = Text(word, style="green bold" if same else "red bold")
        verdict.append(f": {len(self.tensors)} tensors compared; {self.summary()}")
        if self.atol or self.rtol:
            verdict.append(f" (atol {self.atol:g}, rtol {self.rtol:g})")
        return [
            Line(f"A: {_where(self.path_a, self.entry_a)}"),
            Line(f"B: {_where(self.path_b, self.entry_b)}"),
            Columns(
                [[Text(kind, style="bold"), name, detail] for kind, name, detail, _ in rows],
                styles=[style for *_, style in rows],
            ),
            Line(verdict),
        ]

    def __repr__(self) -> str:
        where = f"{_where(self.path_a, self.entry_a)} -> {_where(self.path_b, self.entry_b)}"
        return f"<DiffReport {where}: {self.summary()}>"


def _where(path: str, entry: str) -> str:
    return f"{path} (entry {entry!r})" if entry else path


def _prefix_change(rename: Rename) -> str | None:
    """``module.fc.w -> fc.w``: "prefix 'module.' removed"; None for other renames."""
    if rename.reason != "prefix":
        return None
    if rename.name_a.endswith(rename.name_b):
        return f"prefix {rename.name_a[: -len(rename.name_b)]!r} removed"
    if rename.name_b.endswith(rename.name_a):
        return f"prefix {rename.name_b[: -len(rename.name_a)]!r} added"
    return None


def _rows(report: DiffReport, show_all: bool) -> list[tuple[str, str, str, str | None]]:
    rows: list[tuple[str, str, str, str | None]] = []
    for name in report.removed:
        rows.append(("removed", name, "only in A", "red"))
    for name in report.added:
        rows.append(("added", name, "only in B", "green"))
    grouped: dict[str, int] = {}
    for rename in report.renamed:
        change = _prefix_change(rename)
        if change is not None:
            grouped[change] = grouped.get(change, 0) + 1
        else:
            how = "same values" if rename.reason == "values" else "same after prefixes"
            rows.append(("renamed", f"{rename.name_a} -> {rename.name_b}", how, "yellow"))
    for change, count in grouped.items():
        rows.append(("renamed", f"{count} tensors", change, "yellow"))
    for t in report.tensors:
        rows.extend(_tensor_rows(t, show_all))
    return rows


def _tensor_rows(t: TensorDiff, show_all: bool) -> list[tuple[str, str, str, str | None]]:
    rows: list[tuple[str, str, str, str | None]] = []
    if t.status == "shape":
        rows.append(
            ("shape", t.name_b, f"{shape_text(t.shape_a)} -> {shape_text(t.shape_b)}", "red")
        )
    if t.dtype_changed:
        rows.append(("dtype", t.name_b, f"{t.dtype_a} -> {t.dtype_b}", "magenta"))
    if t.status in ("different", "equal"):
        detail = f"max|a-b| {number(t.max_abs)}  rel L2 {number(t.rel_l2)}  cos {number(t.cosine)}"
        if t.status == "different":
            count = f"{t.mismatched:,} element{'s' if t.mismatched != 1 else ''} differ"
            rows.append(("values", t.name_b, f"{detail}  {count}", "red"))
        elif show_all:
            rows.append(("close", t.name_b, f"{detail}  all within tolerance", None))
    elif t.status == "identical" and show_all:
        rows.append(("identical", t.name_b, "", "dim"))
    return rows


class _Side:
    """One side of a comparison: tensor facts by name and a way to read each tensor."""

    def __init__(self, infos: Mapping[str, TensorInfo], get: Callable[[str], torch.Tensor]) -> None:
        self.infos = infos
        self.get = get


def diff_states(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> DiffReport:
    """Compare two ``{name: tensor}`` mappings.

    Args:
        a: the old state.
        b: the new state.
        atol: absolute tolerance for values to count as equal.
        rtol: relative tolerance (to ``|b|``) for values to count as equal.

    Returns:
        A :class:`DiffReport` with ``path_a="a"`` and ``path_b="b"``.
    """
    outcome = _compare(_side_of(a), _side_of(b), atol=atol, rtol=rtol, progress=None)
    return DiffReport("a", "b", "", "", *outcome, atol, rtol)


def diff(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    *,
    entry: str | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    progress: ProgressOption = None,
) -> DiffReport:
    """Compare the weights in two files of any supported formats.

    Args:
        path_a: the old file or folder.
        path_b: the new file or folder.
        entry: which tensor dict of a checkpoint dict to compare on both sides (default: the
            weights torchkeep picks in each).
        atol: absolute tolerance for values to count as equal.
        rtol: relative tolerance (to ``|b|``) for values to count as equal.
        trust: unpickle without the allowlist. Only for files whose author you trust.
        allow_globals: extra ``"module.name"`` globals the allowlist accepts.
        progress: ``True`` for a progress bar on stderr, or a function called after each
            tensor pair with (bytes compared so far, bytes to compare); off by default.

    Returns:
        A :class:`DiffReport`.

    Either path may be a URL (downloaded or staged first, as for :func:`torchkeep.load`).

    Example:
        >>> report = torchkeep.diff("base.safetensors", "finetuned.safetensors", atol=1e-6)
        >>> print(report.summary())
    """
    if needs_staging(path_a) or needs_staging(path_b):
        with readable(path_a) as local_a, readable(path_b) as local_b:
            return diff(
                local_a,
                local_b,
                entry=entry,
                atol=atol,
                rtol=rtol,
                trust=trust,
                allow_globals=allow_globals,
                progress=progress,
            )
    options = OpenOptions(trust=trust, allow_globals=tuple(allow_globals), mmap=True)
    with (
        open_source(Path(os.fspath(path_a)), options) as src_a,
        open_source(Path(os.fspath(path_b)), options) as src_b,
        reporter(progress, "comparing") as report,
    ):
        entry_a = default_entry(src_a, entry)
        entry_b = default_entry(src_b, entry)
        side_a = _side_of_source(src_a, entry_a)
        side_b = _side_of_source(src_b, entry_b)
        outcome = _compare(side_a, side_b, atol=atol, rtol=rtol, progress=report)
        return DiffReport(src_a.path, src_b.path, entry_a, entry_b, *outcome, atol, rtol)


def _side_of(state: Mapping[str, torch.Tensor]) -> _Side:
    infos = {
        name: TensorInfo(name, tuple(t.shape), dtype_name(t.dtype), t.numel() * t.element_size())
        for name, t in state.items()
    }
    return _Side(infos, lambda name: state[name])


def _side_of_source(source: Source, entry: str) -> _Side:
    return _Side(source.entries()[entry], lambda name: source.get(entry, name))


_Outcome = tuple[tuple[str, ...], tuple[str, ...], tuple[Rename, ...], tuple[TensorDiff, ...]]


def _compare(
    a: _Side, b: _Side, *, atol: float, rtol: float, progress: Progress | None
) -> _Outcome:
    """(added, removed, renamed, compared pairs)."""
    plan = plan_keys(list(a.infos), list(b.infos))
    by_a = {src: dst for dst, src in plan.pairs.items()}
    renamed = [Rename(src, dst, "prefix") for src, dst in by_a.items() if src != dst]
    removed = [n for n in a.infos if n not in by_a]
    added = [n for n in b.infos if n not in plan.pairs]
    for name_a, name_b in _pair_by_values(a, b, removed, added):
        by_a[name_a] = name_b
        renamed.append(Rename(name_a, name_b, "values"))
        removed.remove(name_a)
        added.remove(name_b)
    pairs = [(name, by_a[name]) for name in a.infos if name in by_a]
    total = sum(a.infos[x].nbytes + b.infos[y].nbytes for x, y in pairs)
    done = 0
    tensors: list[TensorDiff] = []
    for name_a, name_b in pairs:
        tensors.append(_compare_pair(a, b, name_a, name_b, atol=atol, rtol=rtol))
        done += a.infos[name_a].nbytes + b.infos[name_b].nbytes
        if progress is not None:
            progress(done, total)
    return tuple(added), tuple(removed), tuple(renamed), tuple(tensors)


def _pair_by_values(
    a: _Side, b: _Side, removed: list[str], added: list[str]
) -> list[tuple[str, str]]:
    """Leftover tensors whose shape, dtype and bytes match exactly one tensor on the other side."""
    kinds_b = {(b.infos[n].shape, b.infos[n].dtype) for n in added}
    candidates_a = [n for n in removed if (a.infos[n].shape, a.infos[n].dtype) in kinds_b]
    if not candidates_a:
        return []
    kinds_a = {(a.infos[n].shape, a.infos[n].dtype) for n in candidates_a}
    candidates_b = [n for n in added if (b.infos[n].shape, b.infos[n].dtype) in kinds_a]

    def digests(side: _Side, names: list[str]) -> dict[tuple[object, ...], list[str]]:
        found: dict[tuple[object, ...], list[str]] = {}
        for name in names:
            info = side.infos[name]
            key = (info.shape, info.dtype, xxh3(to_cpu_contiguous(side.get(name))))
            found.setdefault(key, []).append(name)
        return found

    found_a, found_b = digests(a, candidates_a), digests(b, candidates_b)
    pairs: list[tuple[str, str]] = []
    for key, names_a in found_a.items():
        names_b = found_b.get(key, [])
        # Several zero-filled biases hash alike; pairing them would be a guess.
        if len(names_a) == 1 and len(names_b) == 1:
            pairs.append((names_a[0], names_b[0]))
    return pairs


def _compare_pair(
    a: _Side, b: _Side, name_a: str, name_b: str, *, atol: float, rtol: float
) -> TensorDiff:
    info_a, info_b = a.infos[name_a], b.infos[name_b]
    if info_a.shape != info_b.shape:
        values = ValueDiff("shape", None, None, None, 0)
    else:
        x = to_cpu_contiguous(a.get(name_a))
        y = to_cpu_contiguous(b.get(name_b))
        if x.dtype == y.dtype and torch.equal(_raw(x), _raw(y)):
            values = ValueDiff("identical", 0.0, 0.0, 1.0, 0)
        else:
            values = compare_values(x, y, atol=atol, rtol=rtol)
    return TensorDiff(
        name_a,
        name_b,
        info_a.shape,
        info_b.shape,
        info_a.dtype,
        info_b.dtype,
        values.status,
        values.max_abs,
        values.rel_l2,
        values.cosine,
        values.mismatched,
    )


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 tensor sharing its memory."""
    return tensor.reshape(-1).view(torch.uint8)


def _as_real(tensor: torch.Tensor, complex_values: bool) -> torch.Tensor:
    flat = tensor.reshape(-1)
    if complex_values:
        return torch.view_as_real(flat.to(torch.complex128)).reshape(-1)
    return flat


class ValueDiff(NamedTuple):
    """The value measures of :class:`TensorDiff`, for one pair of same-shaped tensors."""

    status: Status
    max_abs: float | None
    rel_l2: float | None
    cosine: float | None
    mismatched: int


def compare_values(
    x: torch.Tensor, y: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0, chunk: int = _CHUNK
) -> ValueDiff:
    """Difference measures of two same-shaped tensors, computed chunk by chunk in float64.

    Returns:
        A :class:`ValueDiff` whose status is ``"equal"`` or ``"different"``.
    """
    complex_values = x.is_complex() or y.is_complex()
    flat_x, flat_y = _as_real(x, complex_values), _as_real(y, complex_values)
    max_abs = 0.0
    mismatched = 0
    sum_d2 = sum_x2 = sum_y2 = dot = 0.0
    for start in range(0, flat_x.numel(), chunk):
        u = flat_x[start : start + chunk].to(torch.float64)
        v = flat_y[start : start + chunk].to(torch.float64)
        same = (u == v) | (torch.isnan(u) & torch.isnan(v))
        d = torch.where(same, 0.0, (u - v).abs())
        one_nan = torch.isnan(d)
        # 0 * inf is NaN, so equal infinities must be excluded before the tolerance test.
        mismatched += int((one_nan | (~same & ~(d <= atol + rtol * v.abs()))).sum())
        if bool((~one_nan).any()):
            max_abs = max(max_abs, float(d[~one_nan].max()))
        finite = torch.isfinite(u) & torch.isfinite(v)
        uf, vf = torch.where(finite, u, 0.0), torch.where(finite, v, 0.0)
        sum_d2 += float(((uf - vf) ** 2).sum())
        sum_x2 += float((uf * uf).sum())
        sum_y2 += float((vf * vf).sum())
        dot += float((uf * vf).sum())
    if sum_x2 > 0:
        rel_l2 = math.sqrt(sum_d2) / math.sqrt(sum_x2)
    else:
        rel_l2 = 0.0 if sum_d2 == 0 else math.inf
    if sum_x2 == 0 and sum_y2 == 0:
        cosine = 1.0
    elif sum_x2 == 0 or sum_y2 == 0:
        cosine = 0.0
    else:
        cosine = max(-1.0, min(1.0, dot / math.sqrt(sum_x2 * sum_y2)))
    status: Status = "equal" if mismatched == 0 else "different"
    return ValueDiff(status, max_abs, rel_l2, cosine, mismatched)
