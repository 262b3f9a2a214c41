"""What every ``synth`` command shares: the user errors it reports in one line, the teacher options, and
the command line as typed (recorded in each dataset's manifest and card)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

import shards
import zoo
from synth.errors import SynthError

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
                     help="teacher checkpoint: a state_dict (with --arch) or a dict holding one under 'state_dict' "
                          "or 'model', loaded with weights_only=True; TorchScript only with --trust-torchscript. A "
                          "card file beside it (NAME.card.json) supplies the rest. "
                          "[default: the shipped WRN-16-2 trained on FMNIST-32]"),
        click.option("--trust-torchscript", is_flag=True,
                     help="allow a TorchScript --teacher: loading one runs the code stored in it, so only for a file "
                          "whose source you trust"),
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
                 mean: str | None, std: str | None, class_names: str | None,
                 trust_torchscript: bool = False) -> zoo.Classifier:
    overrides = {"arch": arch, "num_classes": num_classes, "input_size": input_size, "mean": _floats(mean),
                 "std": _floats(std), "class_names": _class_names(class_names)}
    if teacher is None:
        path = zoo.default_teacher_path()
        if any(v is not None for v in overrides.values()):
            raise click.UsageError("--arch/--mean/--std/... describe a --teacher; give the checkpoint too")
        return zoo.load_classifier(path)
    return zoo.load_classifier(teacher, trust_torchscript=trust_torchscript,
                               **{k: v for k, v in overrides.items() if v is not None})


class MainGroup(click.Group):
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
