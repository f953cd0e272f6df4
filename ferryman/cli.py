"""The ``ferryman`` command: suite-wide tools."""

from __future__ import annotations

import importlib
import json
from typing import ClassVar

import click

from ferryman.core.cli import FerrymanGroup


class _Commands(FerrymanGroup):
    """Subcommands that live in an app are imported when asked for (``ferryman env`` loads no app)."""

    lazy: ClassVar[dict[str, str]] = {"finetune": "ferryman.apps.lm.cli:finetune", "generate": "ferryman.apps.lm.cli:generate"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_Commands)
@click.version_option(package_name="ferryman")
def main() -> None:
    """Ferryman: large models on the hardware you have.

    finetune and generate work on Hugging Face causal language models; the other apps have their
    own commands: fastfold, opensora, sd-finetune, sd-generate.
    Under torchrun: torchrun --nproc-per-node N -m ferryman.cli finetune ...
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def env(as_json: bool) -> None:
    """Print versions, devices, memory and the tools found, for a problem report.

    \b
    Examples:
      ferryman env
      ferryman env --json > env.json
    """
    from ferryman.core.env import collect, format_report

    info = collect()
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))


if __name__ == "__main__":
    main()
