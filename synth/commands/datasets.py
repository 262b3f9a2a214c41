"""``synth verify`` and ``synth inspect``: check and describe a finished dataset."""

from __future__ import annotations

import json

import click

import shards

from .common import USER_ERRORS


@click.command()
@click.argument("location")
def verify(location: str) -> None:
    """Check every shard of a dataset: presence, size, sha256, tar structure, decodability, counts.

    Exits non-zero, naming the shard, on any problem.
    """
    try:
        problems = shards.verify(location)
    except shards.ShardError as error:
        raise click.ClickException(str(error)) from error
    if problems:
        for problem in problems:
            click.echo(f"FAIL {problem.shard}: {problem.message}", err=True)
        raise click.ClickException(f"{len(problems)} problem(s) in {location}")
    manifest = shards.read_manifest(location)
    click.echo(f"OK {location}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards verified")


@click.command()
@click.argument("location")
@click.option("--grid", type=click.Path(dir_okay=False), default=None,
              help="where to write the sample-grid PNG [default: DIR/samples.png for a local dataset]")
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="teacher checkpoint for the diversity figures [default: the shipped teacher, if it made the set]")
@click.option("--trust-torchscript", is_flag=True,
              help="allow a TorchScript --teacher: loading one runs the code stored in it")
@click.option("--reference", default=None,
              help="real images to compare with (dataset spec: fmnist32, cifar10:PATH, imagefolder:PATH): adds FID, "
                   "JS divergence and MMD in the teacher's feature space")
@click.option("--samples", type=int, default=2000, show_default=True, help="images per set used for the figures")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def inspect(location: str, grid: str | None, teacher: str | None, trust_torchscript: bool, reference: str | None,
            samples: int, device: str, as_json: bool) -> None:
    """Summarise a dataset: counts per class, teacher agreement, entropy, diversity, and a sample grid."""
    from synth.dataset.inspect import inspect_dataset

    try:
        report = inspect_dataset(location, grid=grid, teacher_path=teacher, reference=reference,
                                 samples=samples, device=device, trust_torchscript=trust_torchscript)
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from error
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from synth.dataset.inspect import format_report

    click.echo(format_report(report))
