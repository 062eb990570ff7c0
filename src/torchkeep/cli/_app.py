"""The command group: error handling, exit codes and the options commands share.

Exit codes common to every command:

- 0: success (and, for ``diff``/``verify``/``scan``, the good outcome);
- 1: the command's "found something" outcome (files differ, problems found, unknown globals);
- 2: an error: bad usage, a missing or unreadable file, a refused pickle, any torchkeep error;
- 3: ``scan`` only: dangerous globals found;
- 130: interrupted (Ctrl-C).

Errors print one ``error: <message>`` on stderr. Tracebacks appear only with ``--debug``
(before or after the command name) or ``TORCHKEEP_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from torchkeep.cli._output import error
from torchkeep.errors import TorchkeepError

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_ERROR = 2
EXIT_DANGEROUS = 3
EXIT_INTERRUPTED = 130

_DEBUG_KEY = "torchkeep.debug"
F = TypeVar("F", bound=Callable[..., Any])


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG_KEY] = True


def debug_option(function: F) -> F:
    """``--debug``: show tracebacks instead of one-line errors."""
    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_debug,
        help="Show full tracebacks on errors.",
    )(function)


def _debugging(ctx: click.Context) -> bool:
    return bool(ctx.meta.get(_DEBUG_KEY)) or os.environ.get("TORCHKEEP_DEBUG", "") not in ("", "0")


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]  # KeyError's str() would quote the message
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (TorchkeepError, OSError, ValueError, KeyError)):
        return text
    return f"unexpected {type(exc).__name__}: {text} (this is a bug; rerun with --debug)"


class TorchkeepGroup(click.Group):
    """A group whose commands turn exceptions into ``error: ...`` and exit code 2.

    Its commands are named in ``lazy_commands`` (``{name: (module, summary)}``) and imported
    when used: listing them in ``--help`` takes only their summaries.
    """

    def __init__(
        self, *args: Any, lazy_commands: Mapping[str, tuple[str, str]] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            module = importlib.import_module(self.lazy_commands[cmd_name][0])
            command = next(
                c
                for c in vars(module).values()
                if isinstance(c, click.Command) and c.name == cmd_name
            )
            command.short_help = command.short_help or self.lazy_commands[cmd_name][1]
            self.add_command(command)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, summary) for name, (_, summary) in sorted(self.lazy_commands.items())]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if _debugging(ctx):
                raise
            error("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            if _debugging(ctx):
                raise
            error(_message(exc))
            ctx.exit(EXIT_ERROR)


def json_option(function: F) -> F:
    """``--json``: machine-readable output on stdout."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON on stdout instead of text."
    )(function)


def trust_options(function: F) -> F:
    """``--trust`` and ``--allow-global``: how far pickled files may be unpickled."""
    function = click.option(
        "--allow-global",
        "allow_globals",
        multiple=True,
        metavar="MODULE.NAME",
        help="Let the restricted unpickler resolve this global too (repeatable).",
    )(function)
    return click.option(
        "--trust",
        is_flag=True,
        help="Unpickle without the allowlist. Only for files whose author you trust.",
    )(function)


def entry_option(function: F) -> F:
    """``--entry``: which tensor dict of a checkpoint dict to use."""
    return click.option(
        "--entry",
        default=None,
        metavar="KEY",
        help="Tensor dict inside a checkpoint dict (e.g. model_state_dict); "
        "default: the weights torchkeep finds.",
    )(function)
