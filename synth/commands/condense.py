"""``synth condense``: real data -> a few condensed images per class, for ``--condensed`` (not data-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import USER_ERRORS
from .options import build_config, click_options


def _condense_command(command: Any) -> Any:
    from synth.plugins.condensed.condense import CondenseConfig

    return click_options(CondenseConfig)(command)


@click.command()
@click.option("--data", required=True, metavar="SPEC",
              help="real labelled dataset whose training split is condensed (fmnist32, cifar10:PATH, imagefolder:PATH)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="new folder for the condensed images")
@click.option("--size", type=int, default=None, help="resize imagefolder images to N×N")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--quiet", is_flag=True, help="no progress lines")
@_condense_command
def condense(data: str, out: str, size: int | None, device: str, quiet: bool, **values: Any) -> None:
    """Condense REAL data by distribution matching (Zhao & Bilen 2023) into a few images per class.

    Not data-free: for a user who holds the training data and wants to try `synth run METHOD --condensed OUT`
    (condensed-data-guided inversion). OUT gets OUT/<class>/<n>.png and condense.json, written whole or not at
    all; `distill train --data imagefolder:OUT` trains on it directly.
    """
    from synth.plugins.condensed.condense import CondenseConfig
    from synth.plugins.condensed.condense import condense as run_condense

    try:
        config = build_config(CondenseConfig, None, values)
        info = run_condense(data, Path(out), config, device=device, size=size,
                            log=None if quiet else (lambda m: click.echo(m, err=True)))
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{out}: {info['num_classes']} classes x {config.ipc} condensed images from {data}")
