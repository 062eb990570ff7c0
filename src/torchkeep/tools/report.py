"""One self-contained HTML page describing a checkpoint, or what changed from one to another.

The page holds everything it shows: styles inline, charts as inline SVG drawn by matplotlib
(the optional ``report`` extra), no script, font or image fetched from anywhere, and a
content security policy that forbids fetching. Tensors are read one at a time and summarised in
float64 chunks (:func:`torchkeep.tools.stats.tensor_stats`), so a large checkpoint costs the
memory of its largest tensor; tables list at most ``MAX_ROWS`` rows, so the page stays small.
"""

from __future__ import annotations

import contextlib
import html
import io
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchkeep._facts import TensorInfo, numel
from torchkeep._progress import ProgressOption, reporter
from torchkeep.errors import InvalidArgumentError, MissingDependencyError
from torchkeep.formats._base import OpenOptions
from torchkeep.formats.registry import open_source
from torchkeep.storage.local import atomic_file
from torchkeep.storage.locate import needs_staging, readable
from torchkeep.tools.diff import DiffReport, TensorDiff, diff
from torchkeep.tools.stats import CHUNK, TensorStats, tensor_stats
from torchkeep.weights.entries import default_entry

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Progress = Callable[[int, int], None]
MAX_ROWS = 200  # rows per table; the largest tensors are kept and the rest counted
MAX_TREE_NODES = 300  # modules drawn in the tree
MAX_BARS = 25  # modules in the breakdown chart; the rest are one "other" bar
BINS = 60  # histogram bins
_INSTALL = "pip install torchkeep[report]"


@dataclass(frozen=True)
class _Histogram:
    """Counts of a tensor's finite values in ``BINS`` equal bins from ``low`` to ``high``."""

    name: str
    low: float
    high: float
    counts: tuple[int, ...]
    left_out: int  # NaN and infinite values, not binned


@dataclass
class _Scan:
    """One checkpoint read through: its tensors' facts, statistics and histograms."""

    label: str
    path: str
    format: str
    entry: str
    infos: list[TensorInfo]
    stats: dict[str, TensorStats] = field(default_factory=dict)
    histograms: list[_Histogram] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.infos)

    @property
    def params(self) -> int:
        return sum(numel(info.shape) for info in self.infos)


def report(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    entry: str | None = None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    top: int = 6,
    progress: ProgressOption = None,
) -> Path:
    """Write one self-contained HTML page about a checkpoint, or about two.

    For one checkpoint the page shows its module tree with sizes, parameters and bytes by
    module and by dtype, statistics of every tensor (largest first, at most ``MAX_ROWS``),
    histograms of the ``top`` largest tensors, and every tensor holding NaN or Inf. Given B,
    those describe B, NaN and Inf are looked for in both, and the page adds the relative
    change ``||b - a|| / ||a||`` of each layer in file order and the tensors added, removed,
    renamed or reshaped (as :func:`torchkeep.diff` pairs them).

    Args:
        path_a: the checkpoint (file, folder or URL); with ``path_b``, the old one.
        path_b: the new checkpoint, compared with ``path_a``.
        out: the HTML file to write (replaced in one step).
        entry: which tensor dict of a checkpoint dict to describe (default: the weights
            torchkeep picks in each file).
        trust: unpickle without the allowlist. Only for files whose author you trust.
        allow_globals: extra ``"module.name"`` globals the allowlist accepts.
        top: how many of the largest tensors get a histogram.
        progress: ``True`` for a progress bar on stderr, or a function called as tensors
            are read with (bytes read so far, bytes to read); off by default.

    Returns:
        The path written.

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install torchkeep[report]``).
        InvalidArgumentError: ``top`` is negative.

    Example:
        >>> torchkeep.report("base.safetensors", "finetuned.safetensors", out="report.html")
    """
    if top < 0:
        raise InvalidArgumentError(f"top={top}: the number of histograms cannot be negative")
    _matplotlib()  # before reading anything: a missing extra fails at once
    if needs_staging(path_a) or (path_b is not None and needs_staging(path_b)):
        with readable(path_a) as local_a, _readable_or_none(path_b) as local_b:
            return report(
                local_a,
                local_b,
                out=out,
                entry=entry,
                trust=trust,
                allow_globals=allow_globals,
                top=top,
                progress=progress,
            )
    allow = tuple(allow_globals)
    paths = [Path(os.fspath(path_a))] + ([] if path_b is None else [Path(os.fspath(path_b))])
    with reporter(progress, f"reporting on {paths[-1].name}") as callback:
        return _report(paths, path_b is not None, out, entry, trust, allow, top, callback)


def _report(
    paths: list[Path],
    compare: bool,
    out: str | os.PathLike[str],
    entry: str | None,
    trust: bool,
    allow: tuple[str, ...],
    top: int,
    progress: Progress | None,
) -> Path:
    options = OpenOptions(trust=trust, allow_globals=allow, mmap=True)
    meter = _Meter(progress)
    labels = ["A", "B"] if len(paths) == 2 else [""]
    # Histograms for the last file only: B, when there are two, is what the page describes.
    tops = [0] * (len(paths) - 1) + [top]
    # Each file is read twice when there are two: once here, once by the comparison.
    scans = [
        _scan(path, options, entry, label, tops[i], meter, reads=len(paths))
        for i, (path, label) in enumerate(zip(paths, labels, strict=True))
    ]
    changes = None
    if compare:
        start = meter.done
        changes = diff(
            paths[0],
            paths[1],
            entry=entry,
            trust=trust,
            allow_globals=allow,
            progress=lambda done, total: meter.at(start + done, start + total),
        )
    page = _Page(scans, changes).render()
    with atomic_file(out, durable=False) as temp:
        temp.write_text(page, encoding="utf-8")
    return Path(out)


@contextlib.contextmanager
def _readable_or_none(path: str | os.PathLike[str] | None) -> Iterator[Path | None]:
    if path is None:
        yield None
    else:
        with readable(path) as local:
            yield local


def _scan(
    path: Path,
    options: OpenOptions,
    entry: str | None,
    label: str,
    top: int,
    meter: _Meter,
    *,
    reads: int,
) -> _Scan:
    """Read every tensor of one file once, one at a time: statistics, and histograms of the
    ``top`` largest."""
    with open_source(path, options) as source:
        chosen = default_entry(source, entry)
        infos = list(source.entries()[chosen].values())
        meter.expect(sum(info.nbytes for info in infos) * reads)
        scan = _Scan(label, source.path, source.format, chosen, infos)
        largest = _largest(infos, top)
        for info in infos:
            tensor = source.get(chosen, info.name)
            if _summarisable(tensor):
                stats = tensor_stats(info.name, tensor)
                scan.stats[info.name] = stats
                if info.name in largest and stats.min is not None:
                    scan.histograms.append(_histogram(info.name, tensor, stats))
            del tensor  # the next one is read only once this one is gone
            meter.advance(info.nbytes)
    return scan


class _Meter:
    """Bytes read so far against bytes expected, passed on to a progress callback."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.done = 0
        self.total = 0

    def expect(self, nbytes: int) -> None:
        self.total += nbytes

    def advance(self, nbytes: int) -> None:
        self.at(self.done + nbytes, self.total)

    def at(self, done: int, total: int) -> None:
        self.done, self.total = done, max(total, done)
        if self.progress is not None:
            self.progress(self.done, self.total)


def _summarisable(tensor: torch.Tensor) -> bool:
    return tensor.layout == torch.strided and not tensor.is_quantized and tensor.numel() > 0


def _largest(infos: Sequence[TensorInfo], top: int) -> set[str]:
    ranked = sorted(infos, key=lambda info: -numel(info.shape))
    return {info.name for info in ranked[:top] if numel(info.shape) > 1}


def _histogram(name: str, tensor: torch.Tensor, stats: TensorStats) -> _Histogram:
    """Bin the finite values between the tensor's smallest and largest, chunk by chunk."""
    assert stats.min is not None and stats.max is not None
    low, high = stats.min, stats.max
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts = torch.zeros(BINS, dtype=torch.float64)
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        values = flat[start : start + CHUNK].to(torch.float64)
        values = values[torch.isfinite(values)]
        counts += torch.histc(values, bins=BINS, min=low, max=high)
    return _Histogram(name, low, high, tuple(int(c) for c in counts), stats.nan + stats.inf)


def _square_norm(stats: TensorStats) -> float | None:
    """``sum(a**2)`` over the finite values, from their count, mean and deviation."""
    if stats.mean is None:
        return None
    count = stats.numel - stats.nan - stats.inf
    spread = (count - 1) * stats.std**2 if stats.std is not None else 0.0
    return spread + count * stats.mean**2


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: its name through the first numbered part, else its module.

    ``layers.3.attn.q.weight`` -> ``layers.3``; ``fc.weight`` -> ``fc``; ``scale`` -> ``scale``.
    """
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1]) or name


@dataclass(frozen=True)
class LayerChange:
    """How much one layer moved from A to B."""

    name: str
    rel: float  # ||b - a|| / ||a|| over the layer's compared tensors
    bad: bool  # a tensor of the layer holds NaN or Inf in B


def layer_changes(
    changes: DiffReport,
    squares_a: dict[str, float | None],
    squares_b: dict[str, float | None],
    bad: set[str],
) -> list[LayerChange]:
    """Per-layer relative change in A's order: ``sqrt(sum ||b - a||^2 / sum ||a||^2)``.

    Args:
        changes: the comparison of A with B.
        squares_a: ``sum(a**2)`` of each tensor of A by its name in A (None: not known).
        squares_b: ``sum(b**2)`` of each tensor of B by its name in B, the change of a
            tensor that is all zeros in A.
        bad: names in B of tensors holding NaN or Inf.

    Returns:
        One :class:`LayerChange` per layer with a compared tensor, in A's order.
    """
    sums: dict[str, list[float]] = {}
    flagged: set[str] = set()
    for t in changes.tensors:
        square = squares_a.get(t.name_a)
        if t.rel_l2 is None or square is None:
            continue
        if math.isinf(t.rel_l2):  # A is all zeros there, so the change is B itself
            moved = squares_b.get(t.name_b)
            moved = math.inf if moved is None else moved
        else:
            moved = t.rel_l2**2 * square
        layer = layer_of(t.name_a)
        total = sums.setdefault(layer, [0.0, 0.0])
        total[0] += moved
        total[1] += square
        if t.name_b in bad:
            flagged.add(layer)
    out = []
    for layer, (moved, base) in sums.items():
        rel = math.sqrt(moved / base) if base > 0 else (0.0 if moved == 0 else math.inf)
        out.append(LayerChange(layer, rel, layer in flagged))
    return out


# ------------------------------------------------------------------------------------ charts


def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.figure
    except ImportError as exc:
        raise MissingDependencyError(
            f"the HTML report draws its charts with matplotlib, which is not installed: "
            f"run `{_INSTALL}` (or `pip install matplotlib`)"
        ) from exc
    return matplotlib


class _Charts:
    """Figures drawn without pyplot (no global backend), saved as inline SVG elements."""

    def __init__(self) -> None:
        self.mpl = _matplotlib()
        self.count = 0

    def figure(self, width: float, height: float) -> Figure:
        figure: Figure = self.mpl.figure.Figure(figsize=(width, height), layout="constrained")
        return figure

    def svg(self, figure: Figure, label: str) -> str:
        self.count += 1
        # A salt per chart keeps element ids unique within the page and the output repeatable.
        with self.mpl.rc_context({"svg.hashsalt": f"tk{self.count}", "svg.fonttype": "none"}):
            buffer = io.BytesIO()
            figure.savefig(buffer, format="svg", metadata={"Date": None})
        text = buffer.getvalue().decode("utf-8")
        text = text[text.index("<svg") :]
        text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
        return text.replace(
            "<svg ", f'<svg class="chart" role="img" aria-label="{_esc(label)}" ', 1
        )

    def bars(self, labels: list[str], values: list[float], xlabel: str, label: str) -> str:
        figure = self.figure(7.5, 0.8 + 0.28 * len(labels))
        axes = figure.subplots()
        axes.barh(range(len(labels)), values, color="#4C78A8")
        axes.set_yticks(range(len(labels)), [_short(x, 40) for x in labels], fontsize=8)
        axes.invert_yaxis()
        axes.set_xlabel(xlabel)
        axes.spines[["top", "right"]].set_visible(False)
        return self.svg(figure, label)

    def histogram(self, hist: _Histogram) -> str:
        figure = self.figure(3.6, 2.4)
        axes = figure.subplots()
        width = (hist.high - hist.low) / BINS
        lefts = [hist.low + i * width for i in range(BINS)]
        axes.bar(lefts, hist.counts, width=width, align="edge", color="#4C78A8")
        axes.set_title(_short(hist.name, 45), fontsize=9)
        axes.tick_params(labelsize=7)
        axes.spines[["top", "right"]].set_visible(False)
        return self.svg(figure, f"histogram of {hist.name}")

    def changes(self, layers: list[LayerChange]) -> str:
        finite = [x.rel for x in layers if math.isfinite(x.rel) and x.rel > 0]
        ceiling = max(finite, default=1.0) * 10
        values = [ceiling if math.isinf(x.rel) else x.rel for x in layers]
        figure = self.figure(9.5, 3.4)
        axes = figure.subplots()
        colors = ["#D62728" if x.bad else "#4C78A8" for x in layers]
        axes.bar(range(len(layers)), values, color=colors)
        if finite and max(finite) > 100 * min(finite):
            # Changes span decades; bars start a little below the smallest so each shows.
            axes.set_yscale("log")
            axes.set_ylim(bottom=min(finite) / 3)
        # Every layer named while the names fit; past that, about forty evenly spaced.
        ticks = list(range(0, len(layers), max(1, math.ceil(len(layers) / 40))))
        names = [_short(layers[i].name, 28) for i in ticks]
        axes.set_xticks(ticks, names, rotation=60, ha="right", fontsize=7)
        axes.set_ylabel("||b - a|| / ||a||")
        axes.spines[["top", "right"]].set_visible(False)
        return self.svg(figure, "relative change per layer")


# -------------------------------------------------------------------------------------- page


class _Page:
    """The HTML of a report, section by section."""

    def __init__(self, scans: list[_Scan], changes: DiffReport | None) -> None:
        self.scans = scans
        self.subject = scans[-1]
        self.changes = changes
        self.charts = _Charts()

    def render(self) -> str:
        sections = [
            ("summary", "Summary", self._summary()),
            ("findings", "NaN and Inf values", self._findings()),
        ]
        if self.changes is not None:
            sections.append(("changes", "Changes from A to B", self._changes(self.changes)))
        sections += [
            ("modules", "Parameters by module", self._modules()),
            ("dtypes", "Parameters by dtype", self._dtypes()),
            ("tree", "Module tree", self._tree()),
            ("statistics", "Tensor statistics", self._statistics()),
            ("histograms", "Histograms of the largest tensors", self._histograms()),
        ]
        names = " vs ".join(Path(scan.path).name for scan in self.scans)
        nav = " · ".join(f'<a href="#{key}">{_esc(title)}</a>' for key, title, _ in sections)
        body = "\n".join(
            f'<section id="{key}">\n<h2>{_esc(title)}</h2>\n{content}\n</section>'
            for key, title, content in sections
        )
        return _TEMPLATE.format(
            title=_esc(f"torchkeep report: {names}"),
            style=_STYLE,
            heading=_esc(names),
            nav=nav,
            body=body,
        )

    def _which(self, scan: _Scan) -> str:
        return f"{scan.label}: " if scan.label else ""

    def _summary(self) -> str:
        rows = []
        for scan in self.scans:
            where = scan.path + (f" (entry {scan.entry!r})" if scan.entry else "")
            bad = sum(1 for s in scan.stats.values() if s.nan or s.inf)
            rows.append(
                [
                    scan.label or "file",
                    where,
                    scan.format,
                    f"{len(scan.infos):,}",
                    f"{scan.params:,}",
                    _bytes(scan.nbytes),
                    f"{bad:,}",
                ]
            )
        headers = ["", "path", "format", "tensors", "parameters", "bytes", "with NaN/Inf"]
        text = _table(headers, rows, numeric={3, 4, 5, 6})
        if len(self.scans) == 2:
            text += "<p>Every section below the changes describes B.</p>"
        return text

    def _findings(self) -> str:
        rows, total = [], 0
        for scan in self.scans:
            for info in scan.infos:
                s = scan.stats.get(info.name)
                if s is None or not (s.nan or s.inf):
                    continue
                total += 1
                share = f"{100 * (s.nan + s.inf) / max(s.numel, 1):.3g}%"
                rows.append([scan.label, info.name, f"{s.nan:,}", f"{s.inf:,}", share])
        if not rows:
            files = " and ".join(scan.label for scan in self.scans) or "the checkpoint"
            return f'<p class="ok">No NaN or Inf value in {_esc(files)}.</p>'
        headers = ["file", "tensor", "NaN", "Inf", "of its elements"]
        if len(self.scans) == 1:
            headers, rows = headers[1:], [row[1:] for row in rows]
        intro = (
            f'<p class="alert"><strong>{total} tensor{"s" if total != 1 else ""} '
            f"hold{'s' if total == 1 else ''} NaN or Inf values.</strong></p>"
        )
        return (
            intro
            + _table(headers, rows[:MAX_ROWS], numeric={2, 3, 4}, bad=True)
            + _cut(len(rows), "tensors with NaN or Inf")
        )

    def _changes(self, changes: DiffReport) -> str:
        parts = [f"<p>{_esc(changes.summary())}.</p>"]
        a = self.scans[0]
        squares_a = {name: _square_norm(s) for name, s in a.stats.items()}
        squares_b = {name: _square_norm(s) for name, s in self.subject.stats.items()}
        bad = {name for name, s in self.subject.stats.items() if s.nan or s.inf}
        layers = layer_changes(changes, squares_a, squares_b, bad)
        if any(x.rel > 0 for x in layers):
            parts.append(
                "<h3>Relative change per layer</h3><p>Layers in A's order; red: the layer "
                "holds NaN or Inf in B. Unchanged layers have no bar.</p>"
                + self.charts.changes(layers)
            )
        else:
            parts.append("<p>No compared tensor changed in value.</p>")
        lists = [
            ("Removed (only in A)", [[n] for n in changes.removed], ["tensor"]),
            ("Added (only in B)", [[n] for n in changes.added], ["tensor"]),
            (
                "Renamed",
                [[r.name_a, r.name_b, r.reason] for r in changes.renamed],
                ["in A", "in B", "matched by"],
            ),
            (
                "Shape changed",
                [
                    [t.name_b, _shape(t.shape_a), _shape(t.shape_b)]
                    for t in changes.tensors
                    if t.status == "shape"
                ],
                ["tensor", "shape in A", "shape in B"],
            ),
            (
                "dtype changed",
                [[t.name_b, t.dtype_a, t.dtype_b] for t in changes.dtype_changed],
                ["tensor", "in A", "in B"],
            ),
        ]
        for title, rows, headers in lists:
            if rows:
                parts.append(f"<h3>{_esc(title)}: {len(rows):,}</h3>")
                parts.append(_table(headers, rows[:MAX_ROWS]) + _cut(len(rows), "tensors"))
        moved = sorted(
            (t for t in changes.tensors if t.status == "different"),
            key=lambda t: -(t.rel_l2 if t.rel_l2 is not None else 0.0),
        )
        if moved:
            parts.append(f"<h3>Changed in value: {len(moved):,}, largest change first</h3>")
            parts.append(_changed_table(moved[:MAX_ROWS], bad) + _cut(len(moved), "tensors"))
        return "\n".join(parts)

    def _modules(self) -> str:
        root = _tree_of(self.subject.infos)
        while len(root.children) == 1 and not root.tensors:
            root = next(iter(root.children.values()))
        parts = [(child.path, child.params, child.nbytes) for child in root.children.values()]
        parts += [(t.name, numel(t.shape), t.nbytes) for t in root.tensors]
        parts.sort(key=lambda p: -p[1])
        shown = parts[:MAX_BARS]
        if len(parts) > MAX_BARS:
            rest = parts[MAX_BARS:]
            shown.append(
                (f"({len(rest)} others)", sum(p[1] for p in rest), sum(p[2] for p in rest))
            )
        if not shown:
            return "<p>No tensors.</p>"
        total = max(self.subject.params, 1)
        where = f" of {_esc(root.path)}" if root.path else ""
        chart = self.charts.bars(
            [p[0] for p in shown], [p[1] for p in shown], "parameters", "parameters by module"
        )
        rows = [[p[0], f"{p[1]:,}", f"{p[1] / total:.1%}", _bytes(p[2])] for p in shown]
        return (
            f"<p>The parts{where}, largest first.</p>"
            + chart
            + _table(["module", "parameters", "share", "bytes"], rows, numeric={1, 2, 3})
        )

    def _dtypes(self) -> str:
        by_dtype: dict[str, list[int]] = {}
        for info in self.subject.infos:
            entry = by_dtype.setdefault(info.dtype, [0, 0, 0])
            entry[0] += 1
            entry[1] += numel(info.shape)
            entry[2] += info.nbytes
        ordered = sorted(by_dtype.items(), key=lambda item: -item[1][2])
        chart = self.charts.bars(
            [d for d, _ in ordered], [v[2] for _, v in ordered], "bytes", "bytes by dtype"
        )
        total = max(self.subject.nbytes, 1)
        rows = [
            [d, f"{v[0]:,}", f"{v[1]:,}", _bytes(v[2]), f"{v[2] / total:.1%}"] for d, v in ordered
        ]
        headers = ["dtype", "tensors", "parameters", "bytes", "share of bytes"]
        return chart + _table(headers, rows, numeric={1, 2, 3, 4})

    def _tree(self) -> str:
        root = _tree_of(self.subject.infos)
        budget = [MAX_TREE_NODES]
        total = max(root.params, 1)

        def render(node: _Node, depth: int) -> str:
            budget[0] -= 1
            label = (
                f'<span class="name">{_esc(node.name or "(root)")}</span> '
                f'<span class="size">{node.params:,} params · {_bytes(node.nbytes)} · '
                f"{node.params / total:.1%}</span>"
            )
            if node.tensors:
                names = ", ".join(t.name.rsplit(".", 1)[-1] for t in node.tensors[:8])
                more = f" +{len(node.tensors) - 8}" if len(node.tensors) > 8 else ""
                label += f' <span class="leaf">{_esc(names + more)}</span>'
            if not node.children:
                return f"<li>{label}</li>"
            inner = []
            children = list(node.children.values())
            for index, child in enumerate(children):
                if budget[0] <= 0:
                    inner.append(f'<li class="note">+{len(children) - index} more modules</li>')
                    break
                inner.append(render(child, depth + 1))
            state = " open" if depth < 2 else ""
            return (
                f"<li><details{state}><summary>{label}</summary><ul>"
                + "".join(inner)
                + "</ul></details></li>"
            )

        text = f'<ul class="tree">{render(root, 0)}</ul>'
        note = f'<p class="note">At most {MAX_TREE_NODES} modules are drawn.</p>'
        return text + (note if budget[0] <= 0 else "")

    def _statistics(self) -> str:
        scan = self.subject
        chosen = sorted(scan.infos, key=lambda info: -info.nbytes)[:MAX_ROWS]
        keep = {info.name for info in chosen}
        rows, bad = [], []
        for info in scan.infos:
            if info.name not in keep:
                continue
            s = scan.stats.get(info.name)
            cells = [info.name, _shape(info.shape), info.dtype, _bytes(info.nbytes)]
            if s is None:
                cells += ["-"] * 7
            else:
                cells += [_num(s.min), _num(s.max), _num(s.mean), _num(s.std)]
                cells += [f"{s.nan:,}", f"{s.inf:,}", f"{s.zeros:,}"]
            rows.append(cells)
            bad.append(s is not None and bool(s.nan or s.inf))
        headers = ["tensor", "shape", "dtype", "bytes", "min", "max", "mean", "std"]
        headers += ["NaN", "Inf", "zeros"]
        intro = (
            f"<p>{self._which(scan)}min, max, mean and std of the finite values, computed in "
            "float64; rows in file order.</p>"
        )
        table = _table(headers, rows, numeric=set(range(3, 11)), bad=bad)
        return intro + table + _cut(len(scan.infos), "tensors", "largest ")

    def _histograms(self) -> str:
        hists = self.subject.histograms
        if not hists:
            return "<p>No tensor to draw.</p>"
        cells = []
        for hist in hists:
            note = f"<figcaption>{hist.left_out:,} NaN/Inf not drawn</figcaption>"
            caption = note if hist.left_out else ""
            cells.append(f"<figure>{self.charts.histogram(hist)}{caption}</figure>")
        return '<div class="grid">' + "".join(cells) + "</div>"


def _changed_table(moved: list[TensorDiff], bad: set[str]) -> str:
    rows = [
        [
            t.name_b,
            _num(t.rel_l2),
            _num(t.max_abs),
            _num(t.cosine),
            f"{t.mismatched:,}",
        ]
        for t in moved
    ]
    headers = ["tensor", "||b-a||/||a||", "max |b-a|", "cosine", "elements differ"]
    return _table(headers, rows, numeric={1, 2, 3, 4}, bad=[t.name_b in bad for t in moved])


@dataclass
class _Node:
    name: str
    path: str
    tensors: list[TensorInfo] = field(default_factory=list)
    children: dict[str, _Node] = field(default_factory=dict)
    params: int = 0
    nbytes: int = 0


def _tree_of(infos: Iterable[TensorInfo]) -> _Node:
    root = _Node("", "")
    for info in infos:
        parts = info.name.split(".")
        node = root
        for depth in range(len(parts)):
            node.params += numel(info.shape)
            node.nbytes += info.nbytes
            if depth == len(parts) - 1:
                break
            path = ".".join(parts[: depth + 1])
            node = node.children.setdefault(parts[depth], _Node(parts[depth], path))
        node.tensors.append(info)
    return root


# ------------------------------------------------------------------------------------- pieces


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    numeric: Iterable[int] = (),
    bad: bool | Sequence[bool] = False,
) -> str:
    right = set(numeric)
    flags = [bad] * len(rows) if isinstance(bad, bool) else list(bad)
    head = "".join(
        f"<th{' class=num' if i in right else ''}>{_esc(h)}</th>" for i, h in enumerate(headers)
    )
    lines = []
    for row, flag in zip(rows, flags, strict=True):
        cells = "".join(
            f"<td{' class=num' if i in right else ''}>{_esc(c)}</td>" for i, c in enumerate(row)
        )
        lines.append(f"<tr{' class=bad' if flag else ''}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _cut(count: int, what: str, which: str = "first ") -> str:
    if count <= MAX_ROWS:
        return ""
    return f'<p class="note">Showing the {which}{MAX_ROWS} of {count:,} {_esc(what)}.</p>'


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1150px;padding:16px 24px;color:#1b1f24;background:#fff}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;border-bottom:1px solid #d0d7de;
padding-bottom:4px;margin-top:32px}h3{font-size:15px;margin:20px 0 6px}
nav{font-size:13px;color:#57606a}a{color:#0969da;text-decoration:none}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0;max-width:100%}
th,td{padding:3px 8px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
td{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
th{background:#f6f8fa;position:sticky;top:0}.num{text-align:right;white-space:nowrap}
tr.bad td{background:#ffebe9;color:#a40e26;font-weight:600}
.alert{background:#ffebe9;border:1px solid #ff8182;padding:8px 12px;border-radius:6px;
color:#a40e26}.ok{background:#dafbe1;border:1px solid #4ac26b;padding:8px 12px;
border-radius:6px}.note{color:#57606a;font-style:italic}
svg.chart{max-width:100%;height:auto;display:block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px}
figure{margin:0}figcaption{font-size:12px;color:#a40e26}
ul.tree,ul.tree ul{list-style:none;padding-left:18px;margin:0}ul.tree{padding-left:0}
.tree .name{font-weight:600}.tree .size{color:#57606a;font-size:12px}
.tree .leaf{color:#1a7f37;font-size:12px;font-family:ui-monospace,monospace}
footer{margin-top:40px;color:#57606a;font-size:12px}
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; \
style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{heading}</h1>
<nav>{nav}</nav>
{body}
<footer>Written by torchkeep. This page fetches nothing: charts are inline SVG.
</footer>
</body>
</html>
"""


__all__ = ["MAX_ROWS", "LayerChange", "layer_changes", "layer_of", "report"]
