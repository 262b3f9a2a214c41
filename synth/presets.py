"""Named budgets for ``synth run --preset``.

``paper`` is each method's config defaults (the papers' hyperparameters and iteration counts), sized for
a GPU. ``cpu`` scales the *iteration counts and batch sizes only* down so that a run finishes in minutes
on a 2-core CPU; the loss weights and every other hyperparameter stay the paper's. ``auto`` picks
``paper`` when CUDA is present and ``cpu`` otherwise, and says so. The preset used is recorded in the
manifest with the resolved config.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"run": {"num_images": 50_000}},
    "cpu": {
        "run": {"num_images": 512, "shard_size": 256},
        "deepinversion": {"batch_size": 64, "iterations": 60},
        "gmi": {"batch_size": 64, "inversion_steps": 20, "kd_steps": 5},
        "d2cip": {"batch_size": 64, "inversion_steps": 20, "kd_steps": 5, "prior_iterations": 100},
    },
}


def resolve_preset(name: str, cuda_available: bool) -> str:
    if name == "auto":
        return "paper" if cuda_available else "cpu"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from auto, {', '.join(PRESETS)}")
    return name


def preset_values(name: str, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method config values, run values) of a resolved preset."""
    table = PRESETS[name]
    return dict(table.get(method, {})), dict(table.get("run", {}))
