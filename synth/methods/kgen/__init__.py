"""K-Gen (papers/k-gen.txt): ``kgen`` (multi-resolution) and ``kgen-s`` (one lower resolution).

``method.py`` is the method and its readings; the helpers are K-Gen's own: ``config.py`` (options, resolution plan,
data-memory budget), ``noisy_generator.py`` (noisy layer Z and generator G), ``text_embeddings.py`` (class
representatives f_y), ``cam.py`` (class activation maps, key-region loss), ``embedding_diversity.py`` (Eq. 8-11).
Appendix A.1's fewer-patches ViT is in ``zoo/architectures/fewer_patches_vit.py``: ``distill`` trains ViT
students with it too.
"""

from .method import KGen, KGenS

__all__ = ["KGen", "KGenS"]
