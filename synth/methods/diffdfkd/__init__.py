"""DiffDFKD (papers/diffdfkd.txt): teacher-guided latent editing of a pretrained diffusion model.

``method.py`` is the method and its readings; ``diffusion.py`` finds, identifies and runs the diffusers pipeline
(``diffusers`` is imported only there, only when the method runs), ``cutmix.py`` is Latent CutMix (Eq. 11),
``prompts.py`` the text prompts.
"""

from .method import DiffDFKD, DiffDFKDConfig

__all__ = ["DiffDFKD", "DiffDFKDConfig"]
