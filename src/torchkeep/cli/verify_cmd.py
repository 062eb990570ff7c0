"""``torchkeep verify``: structure, lengths and checksums, every problem named."""

from __future__ import annotations

from pathlib import Path

import click

from torchkeep.cli._app import EXIT_FOUND, EXIT_OK, debug_option, json_option, trust_options
from torchkeep.cli._output import console, emit_json, progress_bar
from torchkeep.tools.verify import verify

EPILOG = """\b
Examples:
  torchkeep verify model.safetensors
  torchkeep verify checkpoints/step-000120.pt
  torchkeep verify sharded-model/ --json

\b
Checks: safetensors header, offsets, length and torchkeep's xxh3 checksums; torch zip
directory and every record's CRC-32; pickles parsed (and loaded through the allowlist);
sharded folders: the index, every shard, and that each shard holds what the index says.

\b
Exit codes:
  0  no problem found
  1  problems found (each one is listed): truncated, damaged, checksum mismatch, not a
     checkpoint at all
  2  error: no such file, bad option
"""


@click.command("verify", epilog=EPILOG)
@click.argument("path", type=click.Path(path_type=Path))
@trust_options
@json_option
@debug_option
@click.pass_context
def command(
    ctx: click.Context, path: Path, trust: bool, allow_globals: tuple[str, ...], as_json: bool
) -> None:
    """Check that a checkpoint is complete and undamaged, naming every problem found."""
    with progress_bar("verifying") as update:
        result = verify(path, trust=trust, allow_globals=allow_globals, progress=update)
    if as_json:
        emit_json({**vars(result), "ok": result.ok})
    else:
        console().print(result)
    ctx.exit(EXIT_OK if result.ok else EXIT_FOUND)
