"""``synth merge A B … --out C [--link]``: unite datasets of one teacher (:mod:`shards.merge`), then write the
merged set's card."""

from __future__ import annotations

import click

from shards.merge import merge as merge_datasets
from synth.dataset.card import publish

from .common import USER_ERRORS, command_line


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="new directory for the merged dataset")
@click.option("--link", is_flag=True,
              help="hard-link the shards instead of copying them (a relative symlink where the filesystem cannot)")
def merge(sources: tuple[str, ...], out: str, link: bool) -> None:
    """Unite datasets of one teacher (e.g. the parts of a fan-out: synth run --rank/--world) into one.

    Each source's method, config and commands are kept as lineage in the manifest and the dataset card.
    Sources whose sample keys overlap (separate runs) are renumbered, which copies the shards.
    """
    try:
        manifest = merge_datasets(list(sources), out, link=link, command=command_line())
        publish(out, manifest)
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from error
    ways = sorted({entry["placed"] for entry in manifest["shards"]})
    click.echo(f"{out}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards from "
               f"{len(sources)} datasets ({', '.join(ways)})")
