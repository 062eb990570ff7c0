"""``torchkeep scan``: every global a pickle references, classified, nothing executed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.text import Text

from torchkeep.cli._app import EXIT_DANGEROUS, EXIT_FOUND, EXIT_OK, debug_option, json_option
from torchkeep.cli._output import console, emit_json, print_columns
from torchkeep.errors import CheckpointNotFoundError, CorruptFileError
from torchkeep.formats.registry import SAFETENSORS
from torchkeep.formats.sharded import find_index, read_index
from torchkeep.safety.contain import member
from torchkeep.safety.unpickle import Verdict, scan_file

EPILOG = """\b
Examples:
  torchkeep scan downloaded.pt
  torchkeep scan model.ckpt --json
  torchkeep scan model.bin || echo "do not load model.bin without --trust"

\b
Every pickle is run on the same checking machine the loaders use (tensors on the meta
device, nothing executed), so scan and the loaders agree.
Verdicts: safe (on torchkeep's allowlist: tensors, containers, plain values), unknown
(usually a class from the author's code: torchkeep reads it as inert data; loading it for
real needs that code and trusts it), dangerous (can run code, import, or touch files or the
network however it is spelled — os.system, torch.os.system, getattr, a module — or the pickle
does something loaders refuse, such as setting attributes on a class).
safetensors files hold no pickle and are always safe.

\b
Exit codes (usable in CI):
  0  safe: every global is on the allowlist (or there is no pickle)
  1  unknown globals, none dangerous
  2  error: no such file, not a pickle, damaged pickle
  3  dangerous globals
"""
_STYLES = {"safe": "green", "unknown": "yellow", "dangerous": "red bold"}
_RANK = {"safe": 0, "unknown": 1, "dangerous": 2}


@dataclass
class FileScan:
    """The globals of one file (none for files that hold no pickle)."""

    file: str
    pickle: bool
    globals: dict[str, Verdict] = field(default_factory=dict)
    problem: str | None = None
    worst: Verdict = "safe"

    @property
    def verdict(self) -> Verdict:
        """The worst verdict of its globals and of what its pickle does."""
        return max([self.worst, *self.globals.values()], key=lambda v: _RANK[v])


def _scan_file(path: Path) -> FileScan:
    with open(path, "rb") as f:
        head = f.read(64)
    if SAFETENSORS.sniff(path, head):
        return FileScan(str(path), pickle=False)
    result = scan_file(str(path))
    if result.corrupt and not result.globals:
        raise CorruptFileError(f"cannot scan {str(path)!r}: {result.problem}")
    return FileScan(str(path), True, result.globals, result.problem, result.verdict)


def _looks_scannable(path: Path) -> bool:
    """Whether a file in a folder is safetensors or pickle-based (JSON, text and the like: no)."""
    with open(path, "rb") as f:
        head = f.read(64)
    return (
        SAFETENSORS.sniff(path, head)
        or head.startswith(b"PK\x03\x04")
        or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
    )


def scan_path(path: Path) -> list[FileScan]:
    """Scan a file, every shard of a sharded folder, or every weights file in a folder."""
    if not path.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {str(path)!r}: the path does not exist")
    if not path.is_dir():
        return [_scan_file(path)]
    index = find_index(path)
    if index is not None:
        shards = sorted(set(read_index(index).values()))
        return [
            _scan_file(member(path, s, path=str(index), what="shard", flat=True)) for s in shards
        ]
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and _looks_scannable(p)]
    if not files:
        raise CheckpointNotFoundError(
            f"folder {str(path)!r} holds no safetensors or pickle-based files to scan"
        )
    return [_scan_file(p) for p in files]


@click.command("scan", epilog=EPILOG)
@click.argument("path", type=click.Path(path_type=Path))
@json_option
@debug_option
@click.pass_context
def command(ctx: click.Context, path: Path, as_json: bool) -> None:
    """List every global the pickles in PATH reference, classified safe, unknown or
    dangerous, without unpickling anything."""
    scans = scan_path(path)
    verdict: Verdict = max((s.verdict for s in scans), key=lambda v: _RANK[v], default="safe")
    if as_json:
        emit_json(
            {
                "path": os.fspath(path),
                "verdict": verdict,
                "files": [
                    {
                        "file": s.file,
                        "pickle": s.pickle,
                        "verdict": s.verdict,
                        "globals": [{"name": n, "verdict": v} for n, v in s.globals.items()],
                        "problem": s.problem,
                    }
                    for s in scans
                ],
            }
        )
    else:
        out = console()
        for scan in scans:
            if not scan.pickle:
                out.print(Text(f"{scan.file}: no pickle: safe", style="green"))
                continue
            out.print(Text(f"{scan.file}: {len(scan.globals)} globals", style="bold"))
            print_columns(
                out, [[Text(v, style=_STYLES[v]), name] for name, v in scan.globals.items()]
            )
            if scan.problem:
                out.print(Text(scan.problem, style=_STYLES[scan.worst]))
        out.print(Text(f"verdict: {verdict}", style=_STYLES[verdict]))
    ctx.exit({"safe": EXIT_OK, "unknown": EXIT_FOUND, "dangerous": EXIT_DANGEROUS}[verdict])
