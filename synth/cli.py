"""``synth``: invert a teacher into a synthetic dataset, and look at or check the result.

    synth list                               the methods and what they do
    synth run METHOD --out DIR [options]     synthesise (resumes if DIR holds a partial run)
    synth inspect DIR                        summary, per-class counts, agreement, diversity, sample grid
    synth verify DIR                         checks every shard; non-zero exit on any problem
    synth merge A B … --out C [--link]       unite datasets of one teacher (fan-out parts) into one
    synth condense --data SPEC --ipc N --out DIR   real data -> condensed images for --condensed (not data-free)
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

import shards
import zoo
from timebudget import parse_duration

from .base import SynthesisMethod
from .config import build_config, click_options
from .errors import SynthError
from .fanout import FanOut
from .presets import RUN_BUDGETS, PresetError, preset_values, resolve_preset
from .registry import all_methods, all_plugins, get_method
from .runner import RunOptions, run

USER_ERRORS: tuple[type[Exception], ...] = (zoo.ZooError, shards.ShardError, SynthError, ValueError, RuntimeError,
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


class _Main(click.Group):
    """Keeps the raw argument list, so a dataset records (in its manifest and card) the command that made it."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        argv = list(args)
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["synth.argv"] = argv
        return ctx


def command_line() -> str:
    """``synth ARGS…`` as the user typed it (shell-quoted)."""
    return shlex.join(["synth", *click.get_current_context().find_root().meta.get("synth.argv", [])])


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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


class _MethodGroup(click.Group):
    """``synth run``: one subcommand per registered method, built when asked for (so discovery is lazy)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(all_methods())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        try:
            return _make_run_command(get_method(name))
        except ValueError:
            return None


@main.group("run", cls=_MethodGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                         "max_content_width": 110})
def run_group() -> None:
    """Synthesise a dataset with METHOD (see `synth list`)."""


_RUN_OPTIONS = ("num_images", "shard_size", "seed", "device", "time_budget")


def _plugin_option_names(method_class: type[SynthesisMethod]) -> dict[str, set[str]]:
    if not method_class.accepts_plugins:
        return {}
    method_fields = {f.name for f in dataclasses.fields(method_class.config_class)}
    names: dict[str, set[str]] = {}
    for name, plugin in all_plugins().items():
        fields = {f.name for f in dataclasses.fields(plugin.options_class)}
        clash = fields & (method_fields | set(_RUN_OPTIONS))
        if clash:
            raise click.ClickException(f"loss plug-in {name!r} defines option(s) {sorted(clash)} that "
                                       f"{method_class.name} already has")
        names[name] = fields
    return names


def _make_run_command(method_class: type[SynthesisMethod]) -> click.Command:
    name = method_class.name
    plugin_fields = _plugin_option_names(method_class)

    def command(out: str, num_images: int | None, shard_size: int | None, seed: int | None,
                device: str | None, time_budget: float | None, config_file: str | None, preset: str, quiet: bool,
                accelerate: bool, rank: int | None, world: int | None,
                teacher: str | None, arch: str | None, num_classes: int | None, input_size: int | None,
                mean: str | None, std: str | None, class_names: str | None, **values: Any) -> None:
        file_method, file_run = _read_pipeline_file(config_file, name)
        import torch

        try:
            preset_name = resolve_preset(preset, torch.cuda.is_available() and (device or "auto") != "cpu")
            preset_method, preset_run = preset_values(preset_name, method_class)
        except PresetError as error:
            raise click.UsageError(str(error)) from error
        if preset_name != "paper":
            click.echo(f"preset '{preset_name}': iteration counts scaled down for a CPU (loss weights are the "
                       "paper's); --preset paper runs the paper's budget", err=True)
        plugin_values = {plugin: {k: values.pop(k) for k in fields} for plugin, fields in plugin_fields.items()}
        plugin_file = {plugin: {k: file_method.pop(k) for k in fields if k in file_method}
                       for plugin, fields in plugin_fields.items()}
        try:
            config = build_config(method_class.config_class, {**preset_method, **file_method}, values)
            plugins = _build_plugins(plugin_file, plugin_values)
            planned = method_class.planned_images(config)
            run_values = {**preset_run, **({"num_images": planned} if planned else {}), "seed": 0,
                          "device": "auto", **file_run}
            for key, value in zip(_RUN_OPTIONS, (num_images, shard_size, seed, device, time_budget), strict=True):
                if value is not None:
                    run_values[key] = value
            if run_values.get("time_budget") is not None and num_images is None and "num_images" not in file_run \
                    and not planned:
                # A time budget alone means "as many images as fit" (up to the paper's count), in shards of one
                # batch, so that the run stops within a batch of its budget.
                run_values["num_images"] = RUN_BUDGETS["paper"]["num_images"]
                if shard_size is None and "shard_size" not in file_run:
                    run_values["shard_size"] = getattr(config, "batch_size", run_values["shard_size"])
            options = RunOptions(out=Path(out), num_images=int(run_values["num_images"]),
                                 shard_size=int(run_values["shard_size"]), seed=int(run_values["seed"]),
                                 device=str(run_values["device"]), progress=not quiet, preset=preset_name,
                                 accelerate=accelerate, time_budget=_duration(run_values.get("time_budget")),
                                 command=command_line(), fanout=FanOut.resolve(rank, world))
            classifier = load_teacher(teacher or file_run.get("teacher"), arch or file_run.get("arch"),
                                      num_classes, input_size, mean, std, class_names)
            run(method_class, config, classifier, options, plugins=plugins, log=lambda m: click.echo(m, err=True))
        except USER_ERRORS as error:
            raise click.ClickException(str(error)) from error

    command.__doc__ = _method_help(method_class)
    command = click_options(method_class.config_class)(command)
    for plugin_name in reversed(list(plugin_fields)):
        command = click_options(all_plugins()[plugin_name].options_class)(command)
    command = teacher_options(command)
    for option in reversed([
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="dataset directory to create, or to resume if it holds a partial run of the same settings"),
        click.option("--num-images", type=int, default=None,
                     help="samples to synthesise [default: 50000; 512 with --preset cpu]"),
        click.option("--shard-size", type=int, default=None,
                     help="samples per tar shard [default: 2000; 256 with --preset cpu]"),
        click.option("--seed", type=int, default=None,
                     help="random seed; the same seed gives the same bytes [default: 0]"),
        click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [default: auto]"),
        click.option("--time-budget", default=None, metavar="DURATION",
                     help="stop at the first shard boundary after this much synthesis time (90s, 20m, 1h30m), "
                          "counting earlier runs of this dataset: a complete, verified dataset that the same command "
                          "with a larger budget continues; with --num-images, whichever comes first; without it, as "
                          "many images as fit (up to 50000) in shards of one batch"),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="pipeline file (TOML): a [synth.METHOD] table of method options and a [synth.run] table "
                          "(num_images, shard_size, seed, device, teacher, arch); command-line options win"),
        click.option("--preset", default="auto", show_default=True,
                     help="budget: 'paper' (the paper's iteration counts, for a GPU), 'cpu' (scaled down to run in "
                          "minutes on a CPU), or 'auto' (paper on CUDA, cpu otherwise)"),
        click.option("--accelerate/--no-accelerate", default=True, show_default=True,
                     help="on CUDA: channels_last layout and bf16 autocast (on a CPU: no change); off: plain fp32"),
        click.option("--quiet", is_flag=True, help="no progress bar"),
        click.option("--rank", type=int, default=None,
                     help="fan-out: this worker's index; it writes OUT/part-RANK (its share of --num-images, its own "
                          "keys and seed); unite the parts with synth merge [default: torchrun's RANK, else 0]"),
        click.option("--world", type=int, default=None,
                     help="fan-out: the number of workers [default: torchrun's WORLD_SIZE, else 1]"),
    ]):
        command = option(command)
    return click.command(name, context_settings={"max_content_width": 110})(command)


def _duration(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--time-budget") from None


def _method_help(method_class: type[SynthesisMethod]) -> str:
    """A screen, not the module docstring: summary, paper, where the derivation lives."""
    module = method_class.__module__.replace(".", "/") + ".py"
    lines = [f"{method_class.summary}.", ""]
    if method_class.paper:
        lines += [f"Paper: {method_class.paper}.", ""]
    lines.append(f"The equations implemented, and every reading where the paper is silent, are written at the top "
                 f"of {module}. Options come from the method's defaults (the paper's), --preset, a pipeline "
                 f"file (--config), then the command line.")
    if method_class.accepts_plugins and all_plugins():
        lines += ["", f"Loss plug-ins accepted: {', '.join(all_plugins())} (their options are below)."]
    return "\n".join(lines)


def _build_plugins(file_values: dict[str, dict[str, Any]], cli_values: dict[str, dict[str, Any]]) -> list[Any]:
    plugins = []
    for name, plugin_class in all_plugins().items():
        if name not in cli_values:
            continue
        options = build_config(plugin_class.options_class, file_values.get(name), cli_values[name])
        if plugin_class.enabled(options):
            plugins.append(plugin_class(options))
    return plugins


def _read_pipeline_file(path: str | None, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if path is None:
        return {}, {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as error:
        raise click.ClickException(f"{path}: not valid TOML: {error}") from error
    synth_table = data.get("synth", {})
    return dict(synth_table.get(method, {})), dict(synth_table.get("run", {}))


def _condense_command(command: Any) -> Any:
    from .condense import CondenseConfig

    return click_options(CondenseConfig)(command)


@main.command()
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
    from .condense import CondenseConfig
    from .condense import condense as run_condense

    try:
        config = build_config(CondenseConfig, None, values)
        info = run_condense(data, Path(out), config, device=device, size=size,
                            log=None if quiet else (lambda m: click.echo(m, err=True)))
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{out}: {info['num_classes']} classes x {config.ipc} condensed images from {data}")


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


from .merge_command import merge  # noqa: E402 (its own module; registered here)

main.add_command(merge)

if __name__ == "__main__":
    sys.exit(main())
