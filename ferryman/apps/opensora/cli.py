"""The ``opensora`` command: STDiT text-to-video diffusion."""

from __future__ import annotations

import click

from ferryman.core.cli import FerrymanGroup


@click.group(cls=FerrymanGroup)
@click.version_option(package_name="ferryman")
def main() -> None:
    """STDiT text-to-video diffusion: train on a CSV of clips and captions, sample to mp4."""
