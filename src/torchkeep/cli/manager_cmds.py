"""``torchkeep ls`` and ``torchkeep prune``: a CheckpointManager folder from the terminal."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.text import Text

from torchkeep._common import COMMIT_MARKERS
from torchkeep.cli._app import debug_option, json_option
from torchkeep.cli._output import console, emit_json, human_bytes, print_columns
from torchkeep.errors import CheckpointNotFoundError
from torchkeep.training.steps import LocalSteps, checkpoints

if TYPE_CHECKING:
    pass

LS_EPILOG = """\b
Examples:
  torchkeep ls runs/exp1
  torchkeep ls runs/exp1 --json | jq '.[] | select(.committed) | .step'

\b
Status: "committed" checkpoints load; "torn" ones (a step folder without checkpoint.json, or a
hidden temporary folder) are leftovers of a save that was interrupted: they are never loaded,
and the next save or `torchkeep prune` removes them.

\b
Exit codes: 0 listed; 2 error (no such folder).
"""

PRUNE_EPILOG = """\b
Examples:
  torchkeep prune runs/exp1 --keep-last 3 --dry-run
  torchkeep prune runs/exp1 --keep-last 2 --keep-best 1 --monitor val_loss
  torchkeep prune runs/exp1 --keep-every 1000 --keep-last 1

\b
The newest committed checkpoint is never deleted. Without any --keep-* option only torn
leftovers are removed. Exit codes: 0 done; 2 error.
"""


# The step a (torn) folder was written for: step-00000020, .step-00000020.tmp-torchkeep-...
STEP_NUMBER = re.compile(r"step-(\d+)")


def _folder(directory: str) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint folder at {directory!r}")
    return path


def _size(path: Path | str) -> int:
    if isinstance(path, str):
        return 0  # a URL (s3://...): sizes would need a listing of every object
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _created(path: Path | str) -> str:
    if isinstance(path, str):
        return ""
    # Native checkpoints have checkpoint.json; distributed ones torchkeep-dcp.json.
    for marker in COMMIT_MARKERS:
        try:
            value = json.loads((path / marker).read_text()).get("created", "")
        except (OSError, ValueError):
            continue
        return str(value)[:19].replace("T", " ")
    return ""


def _rows(steps: LocalSteps) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {
            "step": c.step,
            "path": str(c.path),
            "created": _created(c.path),
            "bytes": _size(c.path),
            "metrics": c.metrics,
            "committed": True,
            "status": "committed",
        }
        for c in checkpoints(steps)
    ]
    for path in steps.torn():
        number = STEP_NUMBER.search(Path(path).name)
        rows.append(
            {
                "step": int(number.group(1)) if number else None,
                "path": str(path),
                "created": "",
                "bytes": _size(path),
                "metrics": {},
                "committed": False,
                "status": "torn (interrupted save)",
            }
        )
    return rows


def _metrics_text(metrics: dict[str, Any]) -> str:
    return "  ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


@click.command("ls", epilog=LS_EPILOG)
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
@debug_option
def ls_command(directory: str, as_json: bool) -> None:
    """List the checkpoints of a CheckpointManager folder: step, time, size, metrics, status."""
    # The step folders are read as the manager reads them, without importing torch.
    steps = LocalSteps(_folder(directory))
    rows = _rows(steps)
    if as_json:
        emit_json(rows)
        return
    out = console()
    if not rows:
        out.print(f"{directory}: no checkpoints")
        return
    committed = [row["step"] for row in rows if row["committed"]]
    latest = max(committed) if committed else None
    table: list[list[str | Text]] = []
    for row in rows:
        step = "-" if row["step"] is None else str(row["step"])
        if row["committed"] and row["step"] == latest:
            step += " (latest)"
        table.append(
            [
                step,
                row["created"],
                human_bytes(row["bytes"]),
                row["status"] if row["committed"] else f"{row['status']}: {Path(row['path']).name}",
                _metrics_text(row["metrics"]),
            ]
        )
    styles: list[str | None] = [None if r["committed"] else "yellow" for r in rows]
    print_columns(
        out,
        table,
        header=["step", "created", "size", "status", "metrics"],
        right=frozenset({2}),
        styles=styles,
    )


@click.command("prune", epilog=PRUNE_EPILOG)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--keep-last", type=click.IntRange(min=1), help="Keep the N newest checkpoints.")
@click.option("--keep-best", type=click.IntRange(min=1), help="Keep the N best by --monitor.")
@click.option("--monitor", help="Metric that ranks checkpoints for --keep-best.")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--keep-every", type=click.IntRange(min=1), help="Keep steps divisible by N.")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@json_option
@debug_option
def prune_command(
    directory: str,
    keep_last: int | None,
    keep_best: int | None,
    monitor: str | None,
    mode: str,
    keep_every: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Apply retention to a CheckpointManager folder and remove torn leftovers."""
    from torchkeep.training.manager import CheckpointManager

    folder = _folder(directory)
    if keep_best is not None and monitor is None:
        raise click.UsageError("--keep-best needs --monitor METRIC")
    if any(v is not None for v in (keep_last, keep_best, keep_every)):
        manager = CheckpointManager(
            folder,
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,  # type: ignore[arg-type]
            keep_every=keep_every,
        )
        steps, torn = manager.prune(dry_run=dry_run)
    else:
        # No policy given: keep every checkpoint, clean up only what interrupted saves left.
        manager = CheckpointManager(folder)
        steps, torn = manager.prune(dry_run=dry_run)
    if as_json:
        emit_json(
            {
                "dry_run": dry_run,
                "deleted_steps": steps,
                "removed_torn": [str(p) for p in torn],
                "kept_steps": manager.steps()
                if not dry_run
                else [s for s in manager.steps() if s not in steps],
            }
        )
        return
    out = console()
    verb = "would delete" if dry_run else "deleted"
    for step in steps:
        out.print(f"{verb} step {step}")
    for path in torn:
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        out.print(f"{'would remove' if dry_run else 'removed'} torn {name}")
    kept = [s for s in manager.steps() if s not in steps] if dry_run else manager.steps()
    out.print(f"kept {len(kept)} checkpoint(s): {', '.join(map(str, kept)) or 'none'}")
