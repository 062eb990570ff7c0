"""One self-contained HTML page describing a checkpoint, or what changed from one to another.

The page holds everything it shows: styles inline, charts as inline SVG drawn by matplotlib
(the optional ``report`` extra), no script, font or image fetched from anywhere, and a
content security policy that forbids fetching. This module gathers what the page shows;
:mod:`torchkeep.tools.report_html` draws it. Tensors are read one at a time and summarised in
float64 chunks (:func:`torchkeep.tools.stats.tensor_stats`), so a large checkpoint costs the
memory of its largest tensor; tables list at most ``MAX_ROWS`` rows, so the page stays small.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from torchkeep._facts import TensorInfo, numel
from torchkeep._progress import ProgressOption, reporter
from torchkeep.errors import InvalidArgumentError
from torchkeep.formats._base import OpenOptions
from torchkeep.formats.registry import open_source
from torchkeep.storage.local import atomic_file
from torchkeep.storage.locate import needs_staging, readable
from torchkeep.tools.diff import DiffReport, diff
from torchkeep.tools.report_html import (
    Histogram,
    LayerChange,
    Scan,
    render_page,
    require_matplotlib,
)
from torchkeep.tools.stats import CHUNK, TensorStats, tensor_stats
from torchkeep.weights.entries import default_entry

Progress = Callable[[int, int], None]
MAX_ROWS = 200  # rows per table; the largest tensors are kept and the rest counted
BINS = 60  # histogram bins


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
    require_matplotlib()  # before reading anything: a missing extra fails at once
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
    layers = [] if changes is None else _layers(scans[0], scans[-1], changes)
    page = render_page(scans, changes, layers, max_rows=MAX_ROWS)
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
) -> Scan:
    """Read every tensor of one file once, one at a time: statistics, and histograms of the
    ``top`` largest."""
    with open_source(path, options) as source:
        chosen = default_entry(source, entry)
        infos = list(source.entries()[chosen].values())
        meter.expect(sum(info.nbytes for info in infos) * reads)
        scan = Scan(label, source.path, source.format, chosen, infos)
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


def _histogram(name: str, tensor: torch.Tensor, stats: TensorStats) -> Histogram:
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
    return Histogram(name, low, high, tuple(int(c) for c in counts), stats.nan + stats.inf)


def _square_norm(stats: TensorStats) -> float | None:
    """``sum(a**2)`` over the finite values, from their count, mean and deviation."""
    if stats.mean is None:
        return None
    count = stats.numel - stats.nan - stats.inf
    spread = (count - 1) * stats.std**2 if stats.std is not None else 0.0
    return spread + count * stats.mean**2


def _layers(a: Scan, b: Scan, changes: DiffReport) -> list[LayerChange]:
    squares_a = {name: _square_norm(s) for name, s in a.stats.items()}
    squares_b = {name: _square_norm(s) for name, s in b.stats.items()}
    return layer_changes(changes, squares_a, squares_b, b.flagged)


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: its name through the first numbered part, else its module.

    ``layers.3.attn.q.weight`` -> ``layers.3``; ``fc.weight`` -> ``fc``; ``scale`` -> ``scale``.
    """
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1]) or name


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


__all__ = ["MAX_ROWS", "LayerChange", "layer_changes", "layer_of", "report"]
