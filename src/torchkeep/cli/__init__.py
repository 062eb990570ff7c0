"""The ``torchkeep`` command: inspect, diff, convert, verify, scan, ls, prune and env.

Each command lives in its own module; adding one is one new module and one line in
``COMMANDS``. Every command calls the same library
functions a Python user would.
"""

from __future__ import annotations

import click

from torchkeep import __version__
from torchkeep.cli._app import TorchkeepGroup, debug_option
from torchkeep.cli._output import QUIET_KEY

# name -> (module, one-line summary for `torchkeep --help`). A command's module is imported
# only when it runs (or its own --help is asked for), so `torchkeep --help` and the commands
# that need no torch never import it.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": (
        "torchkeep.cli.inspect_cmd",
        "Show what a checkpoint holds: format, size, tensors, training state.",
    ),
    "diff": ("torchkeep.cli.diff_cmd", "Compare the weights in two files (any formats)."),
    "convert": (
        "torchkeep.cli.convert_cmd",
        "Convert weights between formats, dtypes and shard sizes.",
    ),
    "verify": (
        "torchkeep.cli.verify_cmd",
        "Check that a checkpoint is complete and undamaged.",
    ),
    "scan": (
        "torchkeep.cli.scan_cmd",
        "List the globals a file's pickles reference, classified, without loading it.",
    ),
    "ls": ("torchkeep.cli.manager_cmds", "List the checkpoints of a CheckpointManager folder."),
    "prune": (
        "torchkeep.cli.manager_cmds",
        "Apply retention to a CheckpointManager folder; remove torn saves.",
    ),
    "report": (
        "torchkeep.cli.report_cmd",
        "Write one self-contained HTML page: sizes, statistics, histograms, changes.",
    ),
    "env": ("torchkeep.cli.env_cmd", "Print torch, CUDA and package versions, and I/O limits."),
}

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
    cls=TorchkeepGroup,
    lazy_commands=COMMANDS,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, "-V", "--version", prog_name="torchkeep")
@debug_option
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, _param, value: ctx.meta.__setitem__(QUIET_KEY, value),
    help="No progress bars (they are drawn only on a terminal anyway).",
)
def main() -> None:
    """Inspect, compare, convert, verify and scan PyTorch checkpoints; list and prune runs."""


__all__ = ["COMMANDS", "main"]
