"""``distill``: train students from a synthetic shard dataset (``distill run``) or on real labelled data
(``distill train``). Thin: parses options into :mod:`distill.runs` option dataclasses, turns the errors a
user can cause into one ``Error: …`` line (exit 1), and prints the summary."""

from __future__ import annotations

import dataclasses
import functools
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from distill.core import precision
from distill.train import DEFAULT_TEMPERATURE, LoopConfig
from zoo.device import PRECISION_HELP, PRECISIONS
from zoo.threads import fit_threads_for_command

#: ``distill run`` on a machine without CUDA, for options not given: a budget that finishes in minutes and
#: spends its time on training (evaluations every 5 epochs on a 2,000-image subset, the full set at the end).
CPU_DEFAULTS = {"epochs": 30, "batch_size": 64, "eval_every": 5}
CPU_PROGRESS_EVAL_SAMPLES = 2000
_EPILOG = "Errors a user can cause print one line and exit with status 1."


class _Main(click.Group):
    """Keeps the raw argument list so outputs can record the exact command that produced them."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        argv = list(args)
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["distill.argv"] = argv
        return ctx


def _command_line() -> str:
    ctx = click.get_current_context()
    return shlex.join(["distill", *ctx.find_root().meta.get("distill.argv", [])])


def _friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """ZooError / ShardError / DataError / DistillError -> ``Error: message`` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from distill.core import DistillError
        from realdata import DataError
        from shards import ShardError
        from zoo import ZooError

        try:
            return fn(*args, **kwargs)
        except (ZooError, ShardError, DataError, DistillError) as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted. Every finished epoch is in <out>/last.pt: rerun the same command with "
                       "--resume to continue.", err=True)
            raise click.Abort() from None

    return wrapper


def _loop_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per :class:`LoopConfig` field, with the dataclass default and help."""
    for f in reversed(dataclasses.fields(LoopConfig)):
        fn = click.option(
            "--" + f.name.replace("_", "-"), f.name, type=type(f.default), default=f.default, show_default=True,
            help=f.metadata["help"],
        )(fn)
    return fn


def _pop_loop(kwargs: dict[str, Any]) -> LoopConfig:
    return LoopConfig(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(LoopConfig)})


def _objective_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per :class:`~distill.objective_choice.ObjectiveOptions` field."""
    from distill.objective_choice import ObjectiveOptions

    for f in reversed(dataclasses.fields(ObjectiveOptions)):
        choices = f.metadata.get("choices")
        kind = click.Choice(list(choices)) if choices else float
        fn = click.option("--" + f.name.replace("_", "-"), f.name, type=kind, default=f.default,
                          show_default=f.default is not None, help=f.metadata["help"])(fn)
    return fn


def _pop_objective(kwargs: dict[str, Any]) -> Any:
    from distill.objective_choice import ObjectiveOptions

    return ObjectiveOptions(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(ObjectiveOptions)})


def _common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--temperature", type=float, default=DEFAULT_TEMPERATURE, show_default=True,
                     help="KD temperature T: loss = KL(softmax(t/T) || softmax(s/T)) * T^2."),
        click.option("--resume", is_flag=True,
                     help="Continue the run whose checkpoint <out>/last.pt exists, from its next epoch."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA when present), cpu, cuda or cuda:N."),
        click.option("--workers", type=int, default=None,
                     help="Decoding processes (shard loading, streaming, image folders). [default: cores, ≤ 8]"),
        click.option("--augment", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="Random crop (4-px padding) + horizontal flip, in batch on the device. auto: off for KD "
                          "from stored logits (they belong to the unaugmented image; measured better), on "
                          "with a live --teacher and for labels."),
        click.option("--max-eval-samples", type=int, default=None,
                     help="Evaluate on a seeded random subset of this many test images (CPU budgets)."),
        click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help=f"{PRECISION_HELP} [default: auto]"),
        click.option("--accelerate/--no-accelerate", default=None, hidden=True,
                     help="Deprecated: --precision auto / --precision fp32."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _precision(kwargs: dict[str, Any]) -> str:
    """Pops --precision and the deprecated --accelerate/--no-accelerate (auto / fp32) from ``kwargs``."""
    chosen, accelerate = kwargs.pop("precision"), kwargs.pop("accelerate")
    if chosen is None and accelerate is not None:
        chosen = "auto" if accelerate else "fp32"
        click.echo(f"--{'' if accelerate else 'no-'}accelerate is deprecated: use --precision {chosen}", err=True)
    return chosen or "auto"


@click.group(cls=_Main, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train student classifiers: from a synthetic dataset (run) or from real data (train)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"Warning: {message}\n"


@main.command(epilog=_EPILOG)
@click.option("--shards", required=True, metavar="DIR|URL",
              help="Dataset directory (or URL) holding manifest.json and shard-*.tar, as written by synth.")
@click.option("--student", default="wrn16_1", show_default=True, metavar="ARCH|PATH",
              help="Student architecture (wrn16_1, resnet8, lenet5, …, tv:NAME), or a checkpoint to warm-start.")
@_loop_options
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="Teacher checkpoint: distil from its live logits on the augmented view instead of the "
                   "stored logits.")
@click.option("--teacher-arch", "--arch", "teacher_arch", default=None,
              help="Architecture of --teacher when it has no card.")
@click.option("--trust-torchscript", is_flag=True,
              help="Allow a TorchScript --teacher: loading one runs the code stored in it, so only for a file whose "
                   "source you trust.")
@click.option("--eval-data", default="auto", show_default=True, metavar="SPEC",
              help="Real dataset whose test split is evaluated every epoch (fmnist32, cifar10:PATH, …). auto: the "
                   "dataset named on the teacher's card when it is found on this machine; none: no evaluation.")
@click.option("--eval-size", type=int, default=None, help="Resize imagefolder eval images to N×N.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory. [default: artifacts/students/<dataset dir name>/<student>]")
@click.option("--cache", type=click.Choice(["auto", "memory", "stream"]), default="auto", show_default=True,
              help="memory: decode all shards once and train from an in-memory (on CUDA: on-GPU) tensor; "
                   "stream: WebDataset streaming through DataLoader workers; auto: memory below 4 GB.")
@click.option("--cache-dir", default=None, metavar="DIR",
              help="Keep remote shards (http(s)://, s3://, …) here, by sha256, as they are first read: later epochs "
                   "and later runs read them from disk, not the network.")
@click.option("--offline", is_flag=True,
              help="Read a remote set's manifest (and its shards) from --cache-dir without asking the server: for a "
                   "set the server no longer has, or no network. Without it a withdrawn manifest is an error.")
@click.option("--resize", type=int, default=None, metavar="N",
              help="Resize every shard image to N×N when loading. Without it, a set whose images are not all at the "
                   "teacher's input size (synth run kgen) trains in batches of one resolution each and is evaluated "
                   "at the evaluation data's size; metrics.json records which (\"resolutions\").")
@click.option("--time-budget", default=None, metavar="DURATION",
              help="Wall time for the whole run (90s, 20m, 1h30m): at every epoch boundary the epochs that still fit "
                   "are planned again from the recent epochs' cost (the final full evaluation kept in reserve) and the "
                   "rest of the cosine schedule is re-laid over them; the run ends at an epoch boundary within about "
                   "one epoch of the budget, and metrics.json records planned vs used seconds (\"time_budget\").")
@click.option("--budget-covers", type=click.Choice(["all", "training"]), default="all", show_default=True,
              help="What --time-budget pays for: all (the whole run, evaluations included) or training (evaluations "
                   "are timed and reported but not charged: for benchmarks, where they cost every method the same).")
@click.option("--synthetic-weight", type=float, default=1.0, show_default=True,
              help="Sets with condensed samples (synth --condensed): weight of the KD expectation over the "
                   "synthetic samples of each batch.")
@click.option("--condensed-weight", type=float, default=1.0, show_default=True,
              help="Sets with condensed samples: weight of the KD expectation over the condensed samples of each "
                   "batch (the condensed share of the batches is reported per epoch). With 1 image per class (a "
                   "~2% share) weight 1 gives those few images most of the push: 0.1 measured better there "
                   "(pipelines/results/fmnist32-cpu-condensed.md).")
@click.option("--progress-eval-samples", type=int, default=None,
              help="Evaluations before the last use a seeded subset of this many test images; the last one always "
                   "uses the whole test set. [default: 2000 on a CPU, all on CUDA]")
@click.option("--msarc-weight", type=float, default=0.0, show_default=True,
              help="With --teacher: weight of mSARC (DiffDFKD Eq. 12), the alignment of the student's class "
                   "activation maps with the teacher's at paired stages; 0: off.")
@click.option("--msarc-stages", default=None, metavar="S1,S2:T1,T2",
              help="Stage modules mSARC pairs (student:teacher, dotted paths). [default: the deepest stages of "
                   "each zoo architecture, paired in order]")
@_objective_options
@_common_options
@_friendly_errors
def run(**kwargs: Any) -> None:
    """Distil a student from a synthetic shard dataset.

    The student learns the objective of the paper of the method that made the dataset (--objective auto: CPSC's
    L_IKD, K-Gen's KD + L_ed, otherwise KD at temperature T; said on the terminal) from the teacher logits stored
    with each image, or from a live --teacher on the same view (with --augment: augmented views labelled by the
    teacher on the fly, Fast's and CMI's regime). Before any data is read the manifest is validated and a student
    whose input shape or class count does not fit is refused. OUT receives student.pt + student.card.json,
    metrics.json, log.csv, accuracy.png and last.pt (the resumable checkpoint).

    \b
    Example:
      distill run --shards artifacts/c10 --student wrn16_1 --eval-data fmnist32 --epochs 100
    """
    from distill.runs import RunOptions, distill_from_shards

    loop = _pop_loop(kwargs)
    objective = _pop_objective(kwargs)
    quiet = kwargs.pop("quiet")
    ctx = click.get_current_context()
    import torch

    budget = kwargs.pop("time_budget")
    if budget is not None:
        from timebudget import parse_duration

        try:
            kwargs["time_budget"] = parse_duration(budget)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--time-budget") from None
    if kwargs["device"] == "cpu" or not torch.cuda.is_available():
        # The CPU budget matches synth's CPU preset (small sets): fewer epochs, smaller batches, and the time
        # goes to training rather than to evaluating 10k images after every epoch.
        changes = {name: value for name, value in CPU_DEFAULTS.items()
                   if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT}
        if changes:
            loop = dataclasses.replace(loop, **changes)
        if kwargs["progress_eval_samples"] is None:
            kwargs["progress_eval_samples"] = CPU_PROGRESS_EVAL_SAMPLES
            changes["progress_eval_samples"] = CPU_PROGRESS_EVAL_SAMPLES
        if changes:
            shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())
            click.echo(f"CPU budget: {shown} (pass them explicitly to override)", err=True)
    job_precision = _precision(kwargs)
    opts = RunOptions(loop=loop, objective=objective, progress=not quiet, command=_command_line(), **kwargs)
    with precision(job_precision):
        result = distill_from_shards(opts)
    if not result.metrics:  # a torchrun rank other than 0: rank 0 wrote and reports
        return
    click.echo(f"wrote {result.out_dir}/student.pt, metrics.json, log.csv, accuracy.png")
    if result.summary_line:
        click.echo(result.summary_line)


@main.command(epilog=_EPILOG)
@click.option("--data", required=True, metavar="SPEC",
              help="Real labelled dataset: fmnist, fmnist32, cifar10:PATH, cifar100:PATH, imagefolder:PATH.")
@click.option("--arch", required=True, help="Architecture to train (wrn16_2, resnet8, …, tv:NAME).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: model.pt + model.card.json, metrics.json, log.csv, accuracy.png, last.pt.")
@_loop_options
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="Distil from this teacher on the real images (KD) instead of learning the labels.")
@click.option("--teacher-arch", default=None, help="Architecture of --teacher when it has no card.")
@click.option("--trust-torchscript", is_flag=True,
              help="Allow a TorchScript --teacher: loading one runs the code stored in it.")
@click.option("--size", type=int, default=None, help="Resize imagefolder images to N×N.")
@click.option("--eval-data", default=None, metavar="SPEC",
              help="Evaluate on this spec's test split instead of --data's.")
@click.option("--max-train-samples", type=int, default=None,
              help="Train on a seeded random subset of this many images (CPU budgets).")
@_common_options
@_friendly_errors
def train(**kwargs: Any) -> None:
    """Train a classifier on real labelled data (teachers; the "student on real labels" reference), or
    with --teacher distil on the real images (the "KD on real images" reference).

    The model's normalisation is the dataset's (realdata.NORMALIZATION, or measured on the training
    images); its card records it with the class names, input size, test accuracy and this command.

    \b
    Example:
      distill train --data fmnist32 --arch wrn16_2 --out artifacts/teachers/wrn16_2-fmnist32 --epochs 30
    """
    from distill.train_real import TrainOptions, train_on_real

    loop = _pop_loop(kwargs)
    quiet = kwargs.pop("quiet")
    job_precision = _precision(kwargs)
    opts = TrainOptions(loop=loop, progress=not quiet, command=_command_line(), **kwargs)
    with precision(job_precision):
        result = train_on_real(opts)
    click.echo(f"wrote {result.out_dir}/model.pt, metrics.json, log.csv, accuracy.png")
    if result.summary_line:
        click.echo(result.summary_line)


def entry() -> None:
    """The ``distill`` console command (and ``python -m distill``): threads fitted to the free cores, then
    :func:`main`."""
    fit_threads_for_command(sys.argv[1:], lambda message: click.echo(message, err=True))
    main()


if __name__ == "__main__":  # pragma: no cover
    entry()
