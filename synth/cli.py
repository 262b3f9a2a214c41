"""``synth``: invert a teacher into a synthetic dataset, and look at or check the result.

    synth list                               the methods and what they do
    synth run METHOD --out DIR [options]     synthesise (resumes if DIR holds a partial run)
    synth inspect DIR                        summary, per-class counts, agreement, diversity, sample grid
    synth verify DIR                         checks every shard; non-zero exit on any problem
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

import shards
import zoo

from . import methods  # noqa: F401  (registers every method)
from .base import METHODS
from .config import build_config, click_options
from .presets import preset_values, resolve_preset
from .runner import RunOptions, run

USER_ERRORS: tuple[type[Exception], ...] = (zoo.ZooError, shards.ShardError, ValueError, RuntimeError,
                                            FileNotFoundError)


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as error:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from error


def _class_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    path = Path(text)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [name.strip() for name in text.split(",")]


def teacher_options(command: Any) -> Any:
    """The options that say which teacher to use and how it sees images."""
    options = [
        click.option("--teacher", type=click.Path(dir_okay=False), default=None,
                     help="teacher checkpoint: a state_dict (with --arch), a dict holding one under 'state_dict' or "
                          "'model', or TorchScript. A card file beside it (NAME.card.json) supplies the rest. "
                          "[default: the shipped WRN-16-2 trained on FMNIST-32]"),
        click.option("--arch", default=None,
                     help="teacher architecture (see `synth list --archs`), when no card says it"),
        click.option("--num-classes", type=int, default=None,
                     help="teacher's class count (inferred from the checkpoint)"),
        click.option("--input-size", type=int, default=None, help="teacher's input height/width in pixels"),
        click.option("--mean", default=None, help="teacher's normalisation mean, e.g. 0.4914,0.4822,0.4465"),
        click.option("--std", default=None, help="teacher's normalisation std, e.g. 0.2470,0.2435,0.2616"),
        click.option("--class-names", default=None, help="comma-separated class names, or a file with one per line"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_teacher(teacher: str | None, arch: str | None, num_classes: int | None, input_size: int | None,
                 mean: str | None, std: str | None, class_names: str | None) -> zoo.Classifier:
    overrides = {"arch": arch, "num_classes": num_classes, "input_size": input_size, "mean": _floats(mean),
                 "std": _floats(std), "class_names": _class_names(class_names)}
    if teacher is None:
        path = zoo.default_teacher_path()
        if any(v is not None for v in overrides.values()):
            raise click.UsageError("--arch/--mean/--std/... describe a --teacher; give the checkpoint too")
        return zoo.load_classifier(path)
    return zoo.load_classifier(teacher, **{k: v for k, v in overrides.items() if v is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
    """Show the synthesis methods (or, with --archs, the architectures)."""
    if archs:
        for name in sorted(zoo.ARCHITECTURES):
            click.echo(name)
        click.echo("tv:NAME  (any torchvision ImageNet classifier, e.g. tv:resnet50)")
        return
    width = max(len(name) for name in METHODS)
    for name, cls in sorted(METHODS.items()):
        click.echo(f"{name.ljust(width)}  {cls.summary}")
    click.echo("\n`synth run METHOD --help` lists every option with its default.")


@main.group("run", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def run_group() -> None:
    """Synthesise a dataset with METHOD (see `synth list`)."""


def _make_run_command(name: str) -> click.Command:
    method_class = METHODS[name]

    def command(out: str, num_images: int | None, shard_size: int | None, seed: int | None,
                device: str | None, config_file: str | None, preset: str, quiet: bool, teacher: str | None,
                arch: str | None,
                num_classes: int | None, input_size: int | None, mean: str | None, std: str | None,
                class_names: str | None, **method_values: Any) -> None:
        file_method, file_run = _read_pipeline_file(config_file, name)
        import torch

        try:
            preset_name = resolve_preset(preset, torch.cuda.is_available() and (device or "auto") != "cpu")
        except ValueError as error:
            raise click.UsageError(str(error)) from error
        preset_method, preset_run = preset_values(preset_name, name)
        if preset_name != "paper":
            click.echo(f"preset '{preset_name}': iteration counts scaled down for a CPU (loss weights are the "
                       "paper's); --preset paper runs the paper's budget", err=True)
        file_method = {**preset_method, **file_method}
        run_values = {"num_images": 50_000, "shard_size": 2_000, "seed": 0, "device": "auto", **preset_run,
                      **file_run}
        for key, value in (("num_images", num_images), ("shard_size", shard_size), ("seed", seed), ("device", device)):
            if value is not None:
                run_values[key] = value
        teacher = teacher or file_run.get("teacher")
        arch = arch or file_run.get("arch")
        try:
            config = build_config(method_class.config_class, file_method, method_values)
            options = RunOptions(out=Path(out), num_images=int(run_values["num_images"]),
                                 shard_size=int(run_values["shard_size"]), seed=int(run_values["seed"]),
                                 device=str(run_values["device"]), progress=not quiet, preset=preset_name)
            classifier = load_teacher(teacher, arch, num_classes, input_size, mean, std, class_names)
            run(method_class, config, classifier, options, log=lambda m: click.echo(m, err=True))
        except USER_ERRORS as error:
            raise click.ClickException(str(error)) from error

    command.__doc__ = f"{method_class.summary}.\n\n{_method_doc(method_class)}"
    command = click_options(method_class.config_class)(command)
    command = teacher_options(command)
    for option in reversed([
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="dataset directory to create, or to resume if it holds a partial run of the same settings"),
        click.option("--num-images", type=int, default=None, help="samples to synthesise [default: 50000]"),
        click.option("--shard-size", type=int, default=None, help="samples per tar shard [default: 2000]"),
        click.option("--seed", type=int, default=None,
                     help="random seed; the same seed gives the same bytes [default: 0]"),
        click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [default: auto]"),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="pipeline file (TOML): a [synth.METHOD] table of method options and a [synth.run] table "
                          "(num_images, shard_size, seed, device, teacher, arch); command-line options win"),
        click.option("--preset", default="auto", show_default=True,
                     help="budget: 'paper' (the paper's iteration counts, for a GPU), 'cpu' (scaled down to run in "
                          "minutes on a CPU), or 'auto' (paper on CUDA, cpu otherwise)"),
        click.option("--quiet", is_flag=True, help="no progress bar"),
    ]):
        command = option(command)
    return click.command(name, context_settings={"max_content_width": 110})(command)


def _method_doc(method_class: type) -> str:
    import inspect

    module_doc = inspect.getmodule(method_class).__doc__ or ""
    return "\b\n" + module_doc.strip() if module_doc else ""


def _read_pipeline_file(path: str | None, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if path is None:
        return {}, {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as error:
        raise click.ClickException(f"{path}: not valid TOML: {error}") from error
    synth_table = data.get("synth", {})
    return dict(synth_table.get(method, {})), dict(synth_table.get("run", {}))


for _name in sorted(METHODS):
    run_group.add_command(_make_run_command(_name))


@main.command()
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


@main.command()
@click.argument("location")
@click.option("--grid", type=click.Path(dir_okay=False), default=None,
              help="where to write the sample-grid PNG [default: DIR/samples.png for a local dataset]")
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="teacher checkpoint for the diversity figures [default: the shipped teacher, if it made the set]")
@click.option("--reference", default=None,
              help="real images to compare with (dataset spec: fmnist32, cifar10:PATH, imagefolder:PATH): adds FID, "
                   "JS divergence and MMD in the teacher's feature space")
@click.option("--samples", type=int, default=2000, show_default=True, help="images per set used for the figures")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def inspect(location: str, grid: str | None, teacher: str | None, reference: str | None, samples: int,
            device: str, as_json: bool) -> None:
    """Summarise a dataset: counts per class, teacher agreement, entropy, diversity, and a sample grid."""
    from .inspect import inspect_dataset

    try:
        report = inspect_dataset(location, grid=grid, teacher_path=teacher, reference=reference,
                                 samples=samples, device=device)
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from error
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from .inspect import format_report

    click.echo(format_report(report))


if __name__ == "__main__":
    sys.exit(main())
