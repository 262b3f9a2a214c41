"""Config dataclasses as command-line options and as pipeline-file tables.

A method's hyperparameters are declared once, as a dataclass with the paper's defaults and a ``help``
string in each field's metadata; :func:`click_options` turns the fields into ``--kebab-case`` options and
:func:`build_config` merges, in increasing priority, the defaults, a pipeline file's table and the
command line.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import click


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    return typing.get_type_hints(cls)[f.name]


def click_options(config_class: type) -> Callable[[Callable], Callable]:
    """A decorator adding one option per dataclass field. Defaults are left ``None`` so that only
    values the user typed override a pipeline file; ``--help`` still shows the paper's default."""

    def decorate(command: Callable) -> Callable:
        for f in reversed(dataclasses.fields(config_class)):
            kind = _field_type(config_class, f)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata.get("help", "")
            flag = f.name.replace("_", "-")
            if kind is bool:
                option = click.option(f"--{flag}/--no-{flag}", f.name, default=None,
                                      help=f"{help_text} [default: {'on' if default else 'off'}]")
            else:
                click_type = {int: int, float: float, str: str}.get(kind, str)
                if typing.get_origin(kind) is typing.Literal:
                    click_type = click.Choice(list(typing.get_args(kind)))
                option = click.option(f"--{flag}", f.name, type=click_type, default=None,
                                      help=f"{help_text} [default: {default}]")
            command = option(command)
        return command

    return decorate


def build_config(config_class: type, file_values: dict[str, Any] | None = None,
                 cli_values: dict[str, Any] | None = None) -> Any:
    """Defaults < pipeline-file values < command-line values. Unknown keys are an error, not ignored."""
    names = {f.name for f in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    for source, given in (("pipeline file", file_values or {}), ("command line", cli_values or {})):
        for key, value in given.items():
            key = key.replace("-", "_")
            if key not in names:
                known = ", ".join(sorted(names))
                raise click.UsageError(f"unknown option {key!r} in the {source} for {config_class.__name__}; "
                                       f"known: {known}")
            if value is not None:
                values[key] = value
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise click.UsageError(f"invalid {config_class.__name__}: {error}") from error
