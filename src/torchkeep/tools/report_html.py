"""The HTML of a report: what :mod:`torchkeep.tools.report` gathered, as one page.

Sections, tables and charts only; nothing here reads a checkpoint. Numbers, bytes and shapes
read as everywhere else in torchkeep (:mod:`torchkeep.weights.render`), the module tree is
:func:`torchkeep.weights.state_tree.build_tree`'s, and every text from a checkpoint is
escaped. Charts are drawn by matplotlib (the optional ``report`` extra) as inline SVG. Needs
no torch.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchkeep._facts import TensorInfo, numel
from torchkeep.errors import MissingDependencyError
from torchkeep.weights.render import human_bytes, number, shape_text
from torchkeep.weights.state_tree import Prefix, build_tree

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from torchkeep.tools.diff import DiffReport, TensorDiff
    from torchkeep.tools.stats import TensorStats

MAX_TREE_NODES = 300  # modules drawn in the tree
MAX_BARS = 25  # modules in the breakdown chart; the rest are one "other" bar
_INSTALL = "pip install torchkeep[report]"


@dataclass(frozen=True)
class Histogram:
    """Counts of a tensor's finite values in equal bins from ``low`` to ``high``."""

    name: str
    low: float
    high: float
    counts: tuple[int, ...]
    left_out: int  # NaN and infinite values, not binned


@dataclass
class Scan:
    """One checkpoint read through: its tensors' facts, statistics and histograms."""

    label: str
    path: str
    format: str
    entry: str
    infos: list[TensorInfo]
    stats: dict[str, TensorStats] = field(default_factory=dict)
    histograms: list[Histogram] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.infos)

    @property
    def params(self) -> int:
        return sum(numel(info.shape) for info in self.infos)

    @property
    def flagged(self) -> set[str]:
        """Names of the tensors holding NaN or Inf."""
        return {name for name, s in self.stats.items() if s.nan or s.inf}


@dataclass(frozen=True)
class LayerChange:
    """How much one layer moved from A to B."""

    name: str
    rel: float  # ||b - a|| / ||a|| over the layer's compared tensors
    bad: bool  # a tensor of the layer holds NaN or Inf in B


def render_page(
    scans: list[Scan],
    changes: DiffReport | None,
    layers: Sequence[LayerChange],
    *,
    max_rows: int,
) -> str:
    """The page about ``scans`` (one, or A and B with their ``changes`` and ``layers``).

    Args:
        scans: the checkpoints read; the last is the one the page describes.
        changes: the comparison of A with B, when there are two.
        layers: the relative change of each layer from A to B, in A's order.
        max_rows: rows per table; the rest are counted in a note.

    Returns:
        The whole HTML document.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    return _Page(scans, changes, layers, max_rows).render()


# ------------------------------------------------------------------------------------ charts


def require_matplotlib() -> Any:
    """The matplotlib module, imported.

    Raises:
        MissingDependencyError: it is not installed (``pip install torchkeep[report]``).
    """
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
        self.mpl = require_matplotlib()
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
            "<svg ", f'<svg class="chart" role="img" aria-label="{escape(label)}" ', 1
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

    def histogram(self, hist: Histogram) -> str:
        figure = self.figure(3.6, 2.4)
        axes = figure.subplots()
        bins = len(hist.counts)
        width = (hist.high - hist.low) / bins
        lefts = [hist.low + i * width for i in range(bins)]
        axes.bar(lefts, hist.counts, width=width, align="edge", color="#4C78A8")
        axes.set_title(_short(hist.name, 45), fontsize=9)
        axes.tick_params(labelsize=7)
        axes.spines[["top", "right"]].set_visible(False)
        return self.svg(figure, f"histogram of {hist.name}")

    def changes(self, layers: Sequence[LayerChange]) -> str:
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

    def __init__(
        self,
        scans: list[Scan],
        changes: DiffReport | None,
        layers: Sequence[LayerChange],
        max_rows: int,
    ) -> None:
        self.scans = scans
        self.subject = scans[-1]
        self.changes = changes
        self.layers = layers
        self.max_rows = max_rows
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
        nav = " · ".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in sections)
        body = "\n".join(
            f'<section id="{key}">\n<h2>{escape(title)}</h2>\n{content}\n</section>'
            for key, title, content in sections
        )
        return _TEMPLATE.format(
            title=escape(f"torchkeep report: {names}"),
            style=_STYLE,
            heading=escape(names),
            nav=nav,
            body=body,
        )

    def _which(self, scan: Scan) -> str:
        return f"{scan.label}: " if scan.label else ""

    def _cut(self, count: int, what: str, which: str = "first ") -> str:
        if count <= self.max_rows:
            return ""
        return (
            f'<p class="note">Showing the {which}{self.max_rows} of {count:,} {escape(what)}.</p>'
        )

    def _summary(self) -> str:
        rows = []
        for scan in self.scans:
            where = scan.path + (f" (entry {scan.entry!r})" if scan.entry else "")
            rows.append(
                [
                    scan.label or "file",
                    where,
                    scan.format,
                    f"{len(scan.infos):,}",
                    f"{scan.params:,}",
                    human_bytes(scan.nbytes),
                    f"{len(scan.flagged):,}",
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
            return f'<p class="ok">No NaN or Inf value in {escape(files)}.</p>'
        headers = ["file", "tensor", "NaN", "Inf", "of its elements"]
        if len(self.scans) == 1:
            headers, rows = headers[1:], [row[1:] for row in rows]
        intro = (
            f'<p class="alert"><strong>{total} tensor{"s" if total != 1 else ""} '
            f"hold{'s' if total == 1 else ''} NaN or Inf values.</strong></p>"
        )
        return (
            intro
            + _table(headers, rows[: self.max_rows], numeric={2, 3, 4}, bad=True)
            + self._cut(len(rows), "tensors with NaN or Inf")
        )

    def _changes(self, changes: DiffReport) -> str:
        parts = [f"<p>{escape(changes.summary())}.</p>"]
        if any(x.rel > 0 for x in self.layers):
            parts.append(
                "<h3>Relative change per layer</h3><p>Layers in A's order; red: the layer "
                "holds NaN or Inf in B. Unchanged layers have no bar.</p>"
                + self.charts.changes(self.layers)
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
                    [t.name_b, shape_text(t.shape_a), shape_text(t.shape_b)]
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
                parts.append(f"<h3>{escape(title)}: {len(rows):,}</h3>")
                parts.append(
                    _table(headers, rows[: self.max_rows]) + self._cut(len(rows), "tensors")
                )
        moved = sorted(
            (t for t in changes.tensors if t.status == "different"),
            key=lambda t: -(t.rel_l2 if t.rel_l2 is not None else 0.0),
        )
        if moved:
            parts.append(f"<h3>Changed in value: {len(moved):,}, largest change first</h3>")
            parts.append(
                _changed_table(moved[: self.max_rows], self.subject.flagged)
                + self._cut(len(moved), "tensors")
            )
        return "\n".join(parts)

    def _modules(self) -> str:
        root = build_tree(self.subject.infos)
        while len(root.children) == 1 and not root.tensors:
            root = next(iter(root.children.values()))
        parts = [(child.path, child.num_params, child.nbytes) for child in root.children.values()]
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
        where = f" of {escape(root.path)}" if root.path else ""
        chart = self.charts.bars(
            [p[0] for p in shown], [p[1] for p in shown], "parameters", "parameters by module"
        )
        rows = [[p[0], f"{p[1]:,}", f"{p[1] / total:.1%}", human_bytes(p[2])] for p in shown]
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
            [d, f"{v[0]:,}", f"{v[1]:,}", human_bytes(v[2]), f"{v[2] / total:.1%}"]
            for d, v in ordered
        ]
        headers = ["dtype", "tensors", "parameters", "bytes", "share of bytes"]
        return chart + _table(headers, rows, numeric={1, 2, 3, 4})

    def _tree(self) -> str:
        root = build_tree(self.subject.infos)
        budget = [MAX_TREE_NODES]
        total = max(root.num_params, 1)

        def render(node: Prefix, depth: int) -> str:
            budget[0] -= 1
            label = (
                f'<span class="name">{escape(node.name or "(root)")}</span> '
                f'<span class="size">{node.num_params:,} params · {human_bytes(node.nbytes)} · '
                f"{node.num_params / total:.1%}</span>"
            )
            if node.tensors:
                names = ", ".join(t.name.rsplit(".", 1)[-1] for t in node.tensors[:8])
                more = f" +{len(node.tensors) - 8}" if len(node.tensors) > 8 else ""
                label += f' <span class="leaf">{escape(names + more)}</span>'
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
        chosen = sorted(scan.infos, key=lambda info: -info.nbytes)[: self.max_rows]
        keep = {info.name for info in chosen}
        rows, bad = [], []
        for info in scan.infos:
            if info.name not in keep:
                continue
            s = scan.stats.get(info.name)
            cells = [info.name, shape_text(info.shape), info.dtype, human_bytes(info.nbytes)]
            if s is None:
                cells += ["-"] * 7
            else:
                cells += [number(s.min), number(s.max), number(s.mean), number(s.std)]
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
        return intro + table + self._cut(len(scan.infos), "tensors", "largest ")

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
        [t.name_b, number(t.rel_l2), number(t.max_abs), number(t.cosine), f"{t.mismatched:,}"]
        for t in moved
    ]
    headers = ["tensor", "||b-a||/||a||", "max |b-a|", "cosine", "elements differ"]
    return _table(headers, rows, numeric={1, 2, 3, 4}, bad=[t.name_b in bad for t in moved])


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
        f"<th{' class=num' if i in right else ''}>{escape(h)}</th>" for i, h in enumerate(headers)
    )
    lines = []
    for row, flag in zip(rows, flags, strict=True):
        cells = "".join(
            f"<td{' class=num' if i in right else ''}>{escape(c)}</td>" for i, c in enumerate(row)
        )
        lines.append(f"<tr{' class=bad' if flag else ''}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _short(text: str, width: int) -> str:
    """The end of a long name (where its parts differ), for a chart's axis."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


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


__all__ = ["Histogram", "LayerChange", "Scan", "render_page", "require_matplotlib"]
