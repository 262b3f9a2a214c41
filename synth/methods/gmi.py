"""gMI: generator-based model inversion, the framework every newer generator method extends.

The general gMI objective as D2CIP (Sec. 3.1) summarises it,

    L_gMI = alpha * L_cls + beta * L_bn + gamma * L_adv                                  (D2CIP Eq. 4)

with the class prior L_cls (Eq. 1), BN-statistics matching L_bn (Eq. 2) and the adversarial term
L_adv = -KL(theta_T(x'), theta_S(x')) (Eq. 3) against the in-loop proxy student, all updating the generator
and the latents. As in CMI and Fast, a generator and per-batch learnable latents are optimised for
``inversion_steps`` steps; here the generator *persists* across batches (``reset_generator=auto`` is
``keep``), so its training accumulates over the run. The loop itself is :mod:`synth.core.inversion`.

Not done yet: the CPU preset only cuts the steps per batch (200 -> 20); an equal-wall-time tuning like D2CIP's
(docs/equal-wall-time.md: steps per batch vs images in the same minutes) needs long benchmark runs and is
still to be run, for gMI as for CMI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from synth.core.inversion import GeneratorInversion
from synth.core.inversion_config import InversionConfig


@dataclass
class GMIConfig(InversionConfig):
    """gMI's hyperparameters: those of the inversion core, with CMI's CIFAR defaults."""

    cpu_budget: ClassVar[dict[str, Any]] = {"batch_size": 64, "inversion_steps": 20, "kd_steps": 5}


class GMI(GeneratorInversion):
    name = "gmi"
    summary = "generator-based model inversion: class prior + BN statistics + adversarial KL (D2CIP Eq. 1-4)"
    paper = "gMI as D2CIP (papers/d2cip.txt) Sec. 3.1 defines it, with the generator of CMI (Fang et al., IJCAI 2021)"
    config_class = GMIConfig
    config: GMIConfig
