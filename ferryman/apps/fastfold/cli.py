"""The ``fastfold`` command: AlphaFold2-style structure prediction and training."""

from __future__ import annotations

import click

from ferryman.core.cli import FerrymanGroup


@click.group(cls=FerrymanGroup)
@click.version_option(package_name="ferryman")
def main() -> None:
    """AlphaFold2-style protein structure prediction on the hardware you have.

    Long sequences are chunked and can be split over GPUs with dynamic axial parallelism.
    """
