"""The ``torchkeep`` command: inspect, diff, convert, verify, scan, ls, prune and env.

Each command lives in its own module; adding one is one new module and one line in
``COMMANDS``. Every command calls the same library
functions a Python user would.
"""

from __future__ import annotations

import click

from torchkeep import __version__
from torchkeep.cli import (
    convert_cmd,
    diff_cmd,
    env_cmd,
    inspect_cmd,
    manager_cmds,
    scan_cmd,
    verify_cmd,
)
from torchkeep.cli._app import TorchkeepGroup, debug_option

COMMANDS: tuple[click.Command, ...] = (
    inspect_cmd.command,
    diff_cmd.command,
    convert_cmd.command,
    verify_cmd.command,
    scan_cmd.command,
    manager_cmds.ls_command,
    manager_cmds.prune_command,
    env_cmd.command,
)

EPILOG = """\b
Examples:
  torchkeep inspect model.safetensors
  torchkeep diff before.pt after.pt --atol 1e-6
  torchkeep convert checkpoint.pt model.safetensors --dtype bfloat16
  torchkeep verify model.safetensors
  torchkeep scan downloaded.pt
  torchkeep ls runs/exp1
  torchkeep prune runs/exp1 --keep-last 3 --dry-run
  torchkeep env

\b
Exit codes: 0 success; 1 differences (diff), problems (verify) or unknown globals (scan);
2 error; 3 dangerous globals (scan); 130 interrupted. Run `torchkeep COMMAND --help`.
"""


@click.group(
    cls=TorchkeepGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, "-V", "--version", prog_name="torchkeep")
@debug_option
def main() -> None:
    """Inspect, compare, convert, verify and scan PyTorch checkpoints; list and prune runs."""


for _command in COMMANDS:
    main.add_command(_command)

__all__ = ["COMMANDS", "main"]
