"""Condensed-data-guided model inversion (papers/condensed-guided-mi.txt) as a loss plug-in (``--condensed``).

``plugin.py`` is the plug-in (conditional feature discriminator, L_G = L_MI + L_FA); ``data.py`` reads and checks a
condensed set; ``condense.py`` makes one from real data (``synth condense``, not data-free).
"""

from .plugin import CondensedGuidance

__all__ = ["CondensedGuidance"]
