"""Click helpers shared by every Ferryman command.

- ``FerrymanGroup`` / ``FerrymanCommand`` turn a ``UserError`` (bad input) into one line,
  ``Error: ...``, and exit status 2, with no traceback.
- ``config_options`` adds ``--config FILE`` and repeatable ``--set KEY=VALUE`` to a command, and
  ``resolve_config`` builds the final config from a preset, the file, the command's own flags and
  the overrides, in that order, validating it once, after everything is merged.
- ``train_options`` adds the flags every training command shares, with one meaning everywhere
  (DESIGN.md: one flag vocabulary); ``train_flags`` maps their values onto the core
  ``TrainConfig`` an app embeds. An app adds only the flags that are its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ferryman.core.config import layered, nest, override_layers, read_mapping
from ferryman.core.errors import UserError, user_message

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class _OneLineUsageError(click.ClickException):
    """A usage error shown as one line (click's own repeats the whole usage block above it)."""

    exit_code = 2


class _UserErrorsAsOneLine:
    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as err:
            where = " ".join(p for p in ((parent.command_path if parent else None), info_name) if p)
            raise _OneLineUsageError(f"{err.format_message()} (see: {where} --help)") from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except click.UsageError as err:  # e.g. a group's unknown subcommand
            raise _OneLineUsageError(f"{err.format_message()} (see: {ctx.command_path} --help)") from None
        except UserError as err:
            click.echo(f"Error: {user_message(err)}", err=True)
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

    ``flags`` maps dotted config keys to flag values. Each value is type-checked as it is laid
    on; the config's own checks (fields that go together, sizes that must divide) run once on
    the result, so the order in which the user gave related settings does not matter.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        layers.append((f"config file {config_file}", read_mapping(config_file)))
    for key, value in (flags or {}).items():
        if value is not None:
            layers.append(("", nest(key, str(value) if isinstance(value, Path) else value)))
    return layered(base, layers + override_layers(overrides))


# --memory: where the trained model's weights, gradients and optimizer state live.
MEMORY_MODES: dict[str, dict[str, Any]] = {
    "plain": {"engine": "plain"},  # everything on the device, torch AdamW
    "gemini-auto": {"engine": "gemini", "gemini": {"placement": "auto"}},  # chunks evicted to the host as the budget needs
    "gemini-offload": {"engine": "gemini",  # every chunk and the optimizer step on the host
                       "gemini": {"placement": "static", "param_host_fraction": 1.0, "optim_host_fraction": 1.0}},
}
PRECISIONS = ("fp32", "bf16", "fp16")
_SHARED = ("max_steps", "checkpoint_every", "resume", "memory", "precision", "grad_accum", "lr")


def train_options(precisions: tuple[str, ...] = PRECISIONS) -> Callable[[F], F]:
    """The shared training flags plus ``--config``/``--set``; read them back with ``train_flags``.

    ``precisions`` narrows --precision for an app that cannot train in some of them.
    """

    def decorate(func: F) -> F:
        options = [
            click.option("--max-steps", type=int, default=None, help="Optimizer updates in all; a resumed run continues up to it."),
            click.option("--checkpoint-every", type=int, default=None,
                         help="Write a checkpoint every N updates (and where the run stops); 0: only at the end."),
            click.option("--resume", default=None, metavar="latest|PATH",
                         help="Continue from the newest complete checkpoint under --out ('latest') or from a checkpoint folder."),
            click.option("--memory", type=click.Choice(list(MEMORY_MODES)), default=None,
                         help="plain: the whole model on the device; gemini-auto: Gemini chunks moved to the host as the "
                              "device budget needs; gemini-offload: every chunk and the optimizer step on the host."),
            click.option("--precision", type=click.Choice(list(precisions)), default=None,
                         help="Compute precision (autocast); master weights and optimizer state stay fp32."),
            click.option("--grad-accum", type=int, default=None, help="Micro-batches accumulated per optimizer update."),
            click.option("--lr", type=float, default=None, help="Peak learning rate (after the warm-up)."),
        ]
        for option in reversed(options):
            func = option(func)
        return config_options(func)

    return decorate


def train_flags(values: dict[str, Any], prefix: str = "train.") -> dict[str, Any]:
    """Pop the shared training flags out of a command's keyword arguments and return them as
    dotted config keys of the ``TrainConfig`` found at ``prefix`` ("" when the config is one)."""
    got = {name: values.pop(name, None) for name in _SHARED}
    flags: dict[str, Any] = {
        f"{prefix}max_steps": got["max_steps"], f"{prefix}ckpt_every": got["checkpoint_every"],
        f"{prefix}resume": got["resume"], f"{prefix}precision": got["precision"],
        f"{prefix}grad_accum": got["grad_accum"], f"{prefix}optim.lr": got["lr"],
    }
    if got["memory"] is not None:
        flags.update(_flatten(MEMORY_MODES[got["memory"]], prefix))
    return flags


def _flatten(mapping: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
