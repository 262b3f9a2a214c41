"""``synth``: invert a teacher into a synthetic dataset, and look at or check the result.

    synth list                               the methods and what they do
    synth run METHOD --out DIR [options]     synthesise (resumes if DIR holds a partial run)
    synth inspect DIR                        summary, per-class counts, agreement, diversity, sample grid
    synth verify DIR                         checks every shard; non-zero exit on any problem
    synth merge A B … --out C [--link]       unite datasets of one teacher (fan-out parts) into one
    synth condense --data SPEC --ipc N --out DIR   real data -> condensed images for --condensed (not data-free)
"""

from __future__ import annotations

import sys

import click

import zoo
from synth.core.registry import all_methods, all_plugins
from zoo.threads import fit_threads_for_command

from .common import MainGroup
from .condense import condense
from .datasets import inspect, verify
from .merge import merge
from .run import run_group


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dfkd-toolkit")
def main() -> None:
    """Invert a trained classifier (the teacher) into a synthetic image dataset.

    The dataset (manifest.json + WebDataset shards holding each image, its asked-for label and the
    teacher's logits) is what `distill run --shards DIR` trains students from.

    \b
    Quick start on the shipped teacher (WRN-16-2, Fashion-MNIST at 32x32):
      synth run gmi --out artifacts/fmnist-gmi --num-images 2048
      synth inspect artifacts/fmnist-gmi
      distill run --shards artifacts/fmnist-gmi --eval-data fmnist32
    """


@main.command("list")
@click.option("--archs", is_flag=True, help="list the model-zoo architectures instead")
def list_methods(archs: bool) -> None:
    """Show the synthesis methods and loss plug-ins (or, with --archs, the architectures)."""
    if archs:
        for name in sorted(zoo.ARCHITECTURES):
            click.echo(name)
        click.echo("tv:NAME  (any torchvision ImageNet classifier, e.g. tv:resnet50)")
        return
    methods, plugins = all_methods(), all_plugins()
    width = max(len(name) for name in [*methods, *plugins])
    for name, cls in methods.items():
        click.echo(f"{name.ljust(width)}  {cls.summary}")
    if plugins:
        click.echo("\nloss plug-ins (options of every generator method):")
        for name, plugin in plugins.items():
            click.echo(f"{name.ljust(width)}  {plugin.summary}")
    click.echo("\n`synth run METHOD --help` lists every option with its default.")


for command in (run_group, inspect, verify, merge, condense):
    main.add_command(command)

def entry() -> None:
    """The ``synth`` console command (and ``python -m synth``): threads fitted to the free cores, then :func:`main`."""
    fit_threads_for_command(sys.argv[1:], lambda message: click.echo(message, err=True))
    main()


if __name__ == "__main__":
    entry()
