"""Named budgets for ``synth run --preset``.

``paper`` is each method's config defaults (the papers' hyperparameters and iteration counts), sized for a
GPU. ``cpu`` scales iteration counts and batch sizes down so that a run finishes in minutes on a 2-core
CPU; loss weights and every other hyperparameter stay the paper's. Each method declares its own CPU budget
on its config class (``cpu_budget``, see :class:`synth.core.protocol.SynthConfig`); the run-level part (how many
images) lives here, once. ``auto`` picks ``paper`` when CUDA is present and ``cpu`` otherwise, and says so.
The preset used is recorded in the manifest with the resolved config.
"""

from __future__ import annotations

from typing import Any

from .core.protocol import SynthesisMethod

PRESETS = ("paper", "cpu")
#: Options of ``synth run`` itself under each preset.
RUN_BUDGETS: dict[str, dict[str, Any]] = {
    "paper": {"num_images": 50_000, "shard_size": 2_000},
    "cpu": {"num_images": 512, "shard_size": 256},
}


class PresetError(ValueError):
    """A preset that does not exist, or a method without a CPU budget asked for one."""


def resolve_preset(name: str, cuda_available: bool) -> str:
    if name == "auto":
        return "paper" if cuda_available else "cpu"
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; choose from auto, {', '.join(PRESETS)}")
    return name


def preset_values(name: str, method: type[SynthesisMethod]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method config values, run values) of a resolved preset."""
    run_values = dict(RUN_BUDGETS[name])
    if name == "paper":
        return {}, run_values
    budget = method.config_class.own_cpu_budget()
    if budget is None:
        raise PresetError(
            f"{method.name} declares no CPU budget ({method.config_class.__name__}.cpu_budget), so --preset cpu "
            "cannot scale it down; run with --preset paper (its full budget), or set the iteration counts "
            "yourself with --preset paper and the method's options")
    return dict(budget), run_values
