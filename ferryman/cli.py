"""The ``ferryman`` command: suite-wide tools."""

from __future__ import annotations

import json

import click

from ferryman.core.cli import FerrymanGroup


@click.group(cls=FerrymanGroup)
@click.version_option(package_name="ferryman")
def main() -> None:
    """Ferryman: large models on the hardware you have.

    The apps have their own commands: fastfold, opensora, sd-finetune, sd-generate.
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
