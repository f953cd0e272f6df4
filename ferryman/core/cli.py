"""Click helpers shared by every Ferryman command.

- ``FerrymanGroup`` / ``FerrymanCommand`` turn a ``UserError`` (bad input) into one line,
  ``Error: ...``, and exit status 2, with no traceback.
- ``config_options`` adds ``--config FILE`` and repeatable ``--set KEY=VALUE`` to a command, and
  ``resolve_config`` builds the final config from a preset, the file, the command's own flags and
  the overrides, in that order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ferryman.core.config import apply_overrides, merge, read_mapping
from ferryman.core.errors import UserError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class _UserErrorsAsOneLine:
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except UserError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted; outputs already finished were kept, nothing half-written.", err=True)
            sys.exit(130)


class FerrymanCommand(_UserErrorsAsOneLine, click.Command):
    """A click command whose user errors end in one clear line."""


class FerrymanGroup(_UserErrorsAsOneLine, click.Group):
    """A click group whose subcommands are FerrymanCommands."""

    command_class = FerrymanCommand

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group_class = FerrymanGroup


def config_options(func: F) -> F:
    """Add ``--config FILE`` and ``--set KEY=VALUE`` (repeatable) to a click command."""
    func = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override any config field, dotted for nested ones (e.g. --set optim.lr=1e-4). Repeatable.",
    )(func)
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="YAML or JSON config to start from (a run's saved config.yaml works).",
    )(func)
    return func


def resolve_config(
    base: T, *, config_file: Path | None, flags: dict[str, Any] | None = None, overrides: tuple[str, ...] = ()
) -> T:
    """base <- config file <- explicit command-line flags (None means 'not given') <- --set overrides.

    ``flags`` maps dotted config keys to flag values.
    """
    cfg = base
    if config_file is not None:
        cfg = merge(cfg, read_mapping(config_file))
    for key, value in (flags or {}).items():
        if value is None:
            continue
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = merge(cfg, nested)
    return apply_overrides(cfg, overrides)
