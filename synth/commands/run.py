"""``synth run METHOD``: one subcommand per registered method, its options built from the method's config
dataclass, the loss plug-ins' options, the teacher options and the run options."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import click

from synth.core.protocol import SynthesisMethod
from synth.core.registry import all_methods, all_plugins, get_method
from synth.fanout import FanOut
from synth.presets import RUN_BUDGETS, PresetError, preset_values, resolve_preset
from synth.runner import RunOptions, run
from timebudget import parse_duration
from zoo.device import PRECISION_HELP, PRECISIONS

from .common import USER_ERRORS, command_line, load_teacher, teacher_options
from .options import build_config, click_options


class _MethodGroup(click.Group):
    """``synth run``: one subcommand per registered method, built when asked for (so discovery is lazy)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(all_methods())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        try:
            return _make_run_command(get_method(name))
        except ValueError:
            return None


@click.group("run", cls=_MethodGroup, context_settings={"help_option_names": ["-h", "--help"],
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
    # A method whose config has its own --precision (DiffDFKD: the diffusion model's weights) shares it with the
    # run: one switch, one option.
    has_precision = "precision" in {f.name for f in dataclasses.fields(method_class.config_class)}

    def command(out: str, num_images: int | None, shard_size: int | None, seed: int | None,
                device: str | None, time_budget: float | None, config_file: str | None, preset: str, quiet: bool,
                precision: str | None, accelerate: bool | None, rank: int | None, world: int | None,
                teacher: str | None, trust_torchscript: bool, arch: str | None, num_classes: int | None,
                input_size: int | None, mean: str | None, std: str | None, class_names: str | None,
                **values: Any) -> None:
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
        if has_precision:  # the method's own option, parsed into this argument: the config reads it too
            values["precision"], precision = precision, None
        plugin_values = {plugin: {k: values.pop(k) for k in fields} for plugin, fields in plugin_fields.items()}
        plugin_file = {plugin: {k: file_method.pop(k) for k in fields if k in file_method}
                       for plugin, fields in plugin_fields.items()}
        try:
            config = build_config(method_class.config_class, {**preset_method, **file_method}, values)
            plugins = _build_plugins(plugin_file, plugin_values)
            classifier = load_teacher(teacher or file_run.get("teacher"), arch or file_run.get("arch"),
                                      num_classes, input_size, mean, std, class_names, trust_torchscript)
            method_class.fit_to_teacher(config, classifier)  # before planning: K-Gen's sizes follow the teacher
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
            run_precision = _precision(config, precision, accelerate)
            options = RunOptions(out=Path(out), num_images=int(run_values["num_images"]),
                                 shard_size=int(run_values["shard_size"]), seed=int(run_values["seed"]),
                                 device=str(run_values["device"]), progress=not quiet, preset=preset_name,
                                 precision=run_precision, time_budget=_duration(run_values.get("time_budget")),
                                 command=command_line(), fanout=FanOut.resolve(rank, world))
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
                     help="stop after the batch during which this much synthesis time is spent (90s, 20m, 1h30m), "
                          "set-up included (D2CIP's stage 1 may take half of it and stops there) and earlier runs of "
                          "this dataset counted: a complete, verified dataset that the same command with a larger "
                          "budget continues with the samples an uninterrupted run makes; with --num-images, whichever "
                          "comes first; without it, as many images as fit (up to 50000) in shards of one batch"),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="pipeline file (TOML): a [synth.METHOD] table of method options and a [synth.run] table "
                          "(num_images, shard_size, seed, device, teacher, arch); command-line options win"),
        click.option("--preset", default="auto", show_default=True,
                     help="budget: 'paper' (the paper's iteration counts, for a GPU), 'cpu' (scaled down to run in "
                          "minutes on a CPU), or 'auto' (paper on CUDA, cpu otherwise)"),
        None if has_precision else click.option(
            "--precision", type=click.Choice(PRECISIONS), default=None,
            help=f"{PRECISION_HELP} Part of the dataset's identity. [default: auto]"),
        click.option("--accelerate/--no-accelerate", default=None, hidden=True,
                     help="deprecated: --precision auto / --precision fp32"),
        click.option("--quiet", is_flag=True, help="no progress bar"),
        click.option("--rank", type=int, default=None,
                     help="fan-out: this worker's index; it writes OUT/part-RANK (its share of --num-images, its own "
                          "keys and seed); unite the parts with synth merge [default: torchrun's RANK, else 0]"),
        click.option("--world", type=int, default=None,
                     help="fan-out: the number of workers [default: torchrun's WORLD_SIZE, else 1]"),
    ]):
        command = option(command) if option is not None else command
    return click.command(name, context_settings={"max_content_width": 110})(command)


def _precision(config: Any, precision: str | None, accelerate: bool | None) -> str:
    """The run's --precision: the option (or the method's own field of that name), else the deprecated
    --accelerate (auto) / --no-accelerate (fp32), else auto."""
    if precision is None and dataclasses.is_dataclass(config) and hasattr(config, "precision"):
        precision = None if config.precision == "auto" else config.precision
    if precision is not None:
        return precision
    if accelerate is not None:
        click.echo(f"--{'' if accelerate else 'no-'}accelerate is deprecated: use --precision "
                   f"{'auto' if accelerate else 'fp32'}", err=True)
        return "auto" if accelerate else "fp32"
    return "auto"


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
