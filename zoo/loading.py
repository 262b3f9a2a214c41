"""Loading and saving classifier checkpoints safely.

:func:`load_classifier` turns a checkpoint file into a :class:`~zoo.Classifier`. It accepts

* a plain ``state_dict`` (name the architecture with ``arch=`` or a card);
* a dict holding one under ``state_dict`` (Fast-Datafree, CMI, NAYER), ``model`` (RepDistiller),
  ``net`` or ``model_state_dict``, with any DataParallel ``module.`` (or ``torch.compile``
  ``_orig_mod.``) prefix stripped;
* a TorchScript archive (``torch.jit.save``), which carries its own architecture, only when the caller
  says it trusts the file (``trust_torchscript=True``, the CLIs' ``--trust-torchscript``).

A checkpoint is untrusted input: files are read with ``torch.load(..., weights_only=True)``, which
unpickles tensors and plain containers only (plus ``argparse.Namespace`` and numpy scalars, which
training scripts often store beside the weights). A file that would need arbitrary Python objects is
refused with :class:`~zoo.ZooError`; it is never retried with ``weights_only=False``. TorchScript is
code (its ``forward``, and ``__setstate__`` hooks that run while it loads, may read and write files), so
a TorchScript file is refused unless trusted, loaded with a warning when it is, and never run just to
learn its class count: that is read from its weights' shapes. The foreign-checkpoint key mapping lives
in :mod:`zoo.keymap`.

The card beside the checkpoint (``X.pt`` -> ``X.card.json``) supplies architecture, normalisation,
input size and class names; explicit arguments override it; the number of classes and input channels
are read from the weights when neither states them. Missing normalisation falls back to mean 0.5 /
std 0.5 with a :class:`~zoo.errors.NormalizationWarning`, because a wrong normalisation silently costs
accuracy.

:func:`save_classifier` writes a network's ``state_dict`` (or TorchScript) atomically and its card with
the sha256 of the written file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atomicio import write_atomic, write_torch_atomic

from .architectures import canonical_arch
from .card import DEFAULT_MEAN, DEFAULT_STD, TeacherCard, card_path_for, read_card_dict
from .classifier import Classifier, is_torchscript
from .errors import NormalizationWarning, ZooError
from .keymap import extract_state_dict, load_network, matching_architectures

__all__ = ["load_classifier", "save_classifier", "default_teacher_path", "load_default_teacher"]

PathLike = str | os.PathLike[str]

_DEFAULT_TEACHER = Path(__file__).resolve().parent / "teachers" / "wrn16_2_fmnist32.pt"


def _safe_types() -> list[Any]:
    """Plain-data types that training scripts store next to the weights; none of them runs code."""
    types: list[Any] = [argparse.Namespace]
    try:
        import numpy as np

        multiarray = getattr(np, "_core", None) or np.core
        # Scalars only (e.g. a numpy best_acc); whole arrays are left out on purpose.
        types += [multiarray.multiarray.scalar, np.dtype]
        types += [cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    except (ImportError, AttributeError):  # numpy missing or laid out differently: plain torch only
        pass
    return types


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_torchscript_file(path: Path) -> bool:
    # torch.jit.save archives hold <name>/constants.pkl and <name>/code/; torch.save archives do not.
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("constants.pkl") or "/code/" in n or n.startswith("code/") for n in names)


def _torch_load(path: Path, map_location: Any) -> Any:
    safe = _safe_types()
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # The weights-only unpickler names the first global it refused; anything else means a corrupt file.
        offending = re.findall(r"GLOBAL ([\w.]+)", text)
        if not offending and "unsupported global" not in text.lower():
            reason = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text else ""
            raise ZooError(f"cannot read checkpoint {path}: not a PyTorch checkpoint or corrupt ({reason})") from None
        try:
            safe_names = {f"{t.__module__}.{t.__qualname__}" for t in safe}
            scanned = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            offending = [g for g in scanned if g not in safe_names] or offending
        except Exception:  # the scan only improves the message (legacy-format files cannot be scanned)
            pass
        what = f" ({', '.join(offending[:5])})" if offending else ""
        raise ZooError(
            f"{path} contains pickled Python objects{what} that could run code when loaded, so it is refused "
            "(checkpoints are loaded with weights_only=True). If you trust its source, re-save only the "
            "weights, e.g. torch.save(model.state_dict(), 'weights.pt'), or export it with torch.jit.save"
        ) from None
    except Exception as exc:  # a corrupt or foreign file can fail in many ways
        raise ZooError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _load_torchscript(
    path: Path,
    map_location: Any,
    num_classes: int | None,
    num_classes_from: str,
    in_channels: int | None,
    in_channels_from: str,
) -> tuple[nn.Module, int, int]:
    warnings.warn(
        f"{path}: loading TorchScript runs code stored in the file (you trusted it with --trust-torchscript); "
        "a plain state_dict with --arch runs none",
        UserWarning,
        stacklevel=3,
    )
    try:
        with warnings.catch_warnings():
            # torch.jit.load is deprecated in favour of torch.export; the user chose this format, so that is noise.
            warnings.simplefilter("ignore", FutureWarning)
            network = torch.jit.load(str(path), map_location=map_location)
    except Exception as exc:
        raise ZooError(f"cannot load TorchScript archive {path}: {type(exc).__name__}: {exc}") from exc
    network.eval()
    # Shapes only, no forward pass: the first 4-D weight takes the input channels, the last 2-D weight's rows
    # are the classes (a final Linear layer); what is stated must agree, and what cannot be read must be stated.
    state = network.state_dict()
    first_4d = next((v for v in state.values() if v.dim() == 4), None)
    last_2d = next((v for k, v in reversed(state.items()) if v.dim() == 2 and k.endswith("weight")), None)
    channels = int(first_4d.shape[1]) if first_4d is not None else in_channels or 3
    classes = int(last_2d.shape[0]) if last_2d is not None else num_classes
    if in_channels is not None and channels != in_channels:
        raise ZooError(f"{path}: its first convolution takes {channels} input channels, {in_channels_from} "
                       f"{in_channels}")
    if classes is None:
        raise ZooError(f"{path}: TorchScript model without a final Linear layer; its class count cannot be read "
                       "from its weights, so pass --num-classes (num_classes=) or add a card")
    if num_classes is not None and num_classes != classes:
        raise ZooError(f"{path}: checkpoint has {classes} classes, {num_classes_from} {num_classes}")
    return network, classes, channels


def load_classifier(
    path: PathLike,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    map_location: Any = "cpu",
    trust_torchscript: bool = False,
) -> Classifier:
    """The classifier stored at ``path``, in eval mode, with its card (sha256 of the file included).

    Explicit arguments override the card beside the checkpoint (``X.card.json``); the number of classes
    and input channels are read from the weights when neither gives them, and must agree with them
    when given. Raises :class:`ZooError` for a missing file, an unknown or unstated architecture, a
    checkpoint that does not fit the architecture (naming missing/unexpected keys and the architectures
    that would fit), a class-count mismatch, a file that needs pickled code to load, or a TorchScript
    file without ``trust_torchscript`` (loading TorchScript runs the code in it; when trusted it is
    loaded with a warning and never run just to count its classes).
    """
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"no checkpoint file at {path}")
    card_file = card_path_for(path)
    card_data: dict[str, Any] = read_card_dict(card_file) if card_file.is_file() else {}
    digest = _sha256(path)
    if card_data.get("sha256") and card_data["sha256"] != digest:
        warnings.warn(
            f"{card_file} records sha256 {card_data['sha256'][:12]}... but {path.name} hashes to "
            f"{digest[:12]}...; the card may describe another checkpoint",
            stacklevel=2,
        )

    def choose(name: str, explicit: Any) -> tuple[Any, str]:
        if explicit is not None:
            return explicit, "you said"
        if card_data.get(name) is not None:
            return card_data[name], f"its card {card_file.name} says"
        return None, ""

    arch_value, _ = choose("arch", arch)
    classes_value, classes_from = choose("num_classes", num_classes)
    channels_value, channels_from = choose("in_channels", in_channels)

    if _is_torchscript_file(path):
        if not trust_torchscript:
            raise ZooError(
                f"{path} is a TorchScript archive, and loading one runs the code stored in it. It is refused "
                "unless you trust where it came from and say so: --trust-torchscript (trust_torchscript=True). "
                "Safer: export its weights, torch.save(model.state_dict(), 'weights.pt'), and load those with --arch"
            )
        size_value = choose("input_size", input_size)[0] or 32
        network, classes, channels = _load_torchscript(
            path, map_location, classes_value, classes_from, channels_value, channels_from
        )
        arch_name = str(arch_value) if arch_value else "torchscript"
    else:
        state = extract_state_dict(_torch_load(path, map_location), path)
        if not arch_value:
            candidates = matching_architectures(state)
            hint = f" (architectures whose keys match: {', '.join(candidates)})" if candidates else ""
            raise ZooError(
                f"{path} is a plain state_dict and says nothing about its architecture; pass --arch NAME"
                f"{hint} or add a card {card_file.name} beside it"
            )
        network, classes, channels = load_network(
            path, str(arch_value), state, classes_value, classes_from, channels_value, channels_from
        )
        arch_name = canonical_arch(str(arch_value))
        size_value = choose("input_size", input_size)[0] or (224 if arch_name.startswith("tv:") else 32)

    mean_value, mean_from = choose("mean", mean)
    std_value, std_from = choose("std", std)
    defaulted = [name for name, value in (("mean", mean_value), ("std", std_value)) if value is None]
    if defaulted:
        warnings.warn(
            f"{path}: no {' or '.join(defaulted)} given (no card field, no argument); assuming "
            f"mean={DEFAULT_MEAN} std={DEFAULT_STD} per channel. Normalisation is part of a teacher's "
            "identity and a wrong one silently costs accuracy: pass --mean/--std or add them to "
            f"{card_file.name}",
            NormalizationWarning,
            stacklevel=2,
        )
        source = "default"
    else:
        source = "given" if "you said" in (mean_from, std_from) else "card"

    names_value, _ = choose("class_names", class_names)
    card = TeacherCard(
        arch=arch_name,
        num_classes=classes,
        in_channels=channels,
        input_size=int(size_value),
        mean=tuple(mean_value) if mean_value is not None else None,
        std=tuple(std_value) if std_value is not None else None,
        class_names=list(names_value) if names_value is not None else [],
        sha256=digest,
        test_accuracy=card_data.get("test_accuracy"),
        dataset=card_data.get("dataset"),
        command=card_data.get("command"),
    )
    classifier = Classifier(network, card=card)
    classifier.normalization_source = source
    return classifier.eval()


def save_classifier(classifier: Classifier, path: PathLike, **card_updates: Any) -> TeacherCard:
    """Writes ``classifier.network``'s weights to ``path`` and its card to ``X.card.json``; returns the card.

    The weights are a plain CPU ``state_dict`` (TorchScript networks are saved with ``torch.jit.save``),
    written to a temporary file and renamed, so ``path`` never holds a partial file. ``card_updates``
    set card fields such as ``test_accuracy``, ``dataset``, ``command`` or ``class_names``; fields that
    must agree with the network (``num_classes``, ``in_channels``, ``mean``, ``std``) cannot be changed
    here, and ``sha256`` is always that of the written file. The classifier's card is replaced by the
    returned one.
    """
    path = Path(path)
    current = classifier.card
    card_updates.pop("sha256", None)
    updated = current.replace(**card_updates)
    for name in ("num_classes", "in_channels", "mean", "std"):
        if getattr(updated, name) != getattr(current, name):
            raise ZooError(
                f"save_classifier cannot change '{name}' ({getattr(current, name)} -> {getattr(updated, name)}): "
                "it must agree with the network; build a new Classifier instead"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    network = classifier.network
    if is_torchscript(network):

        def write_script(tmp: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(network, str(tmp))

        write_atomic(path, write_script)
    else:
        state = network.state_dict()
        cpu_state: OrderedDict[str, torch.Tensor] = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            cpu_state._metadata = metadata  # type: ignore[attr-defined]  # layer versions, as torch keeps them
        write_torch_atomic(path, cpu_state)
    card = updated.replace(sha256=_sha256(path))
    card.save(card_path_for(path))
    classifier.card = card
    return card


def default_teacher_path() -> Path:
    """Path of the shipped teacher: WRN-16-2 trained on FMNIST-32 (``zoo/teachers/wrn16_2_fmnist32.pt``)."""
    return _DEFAULT_TEACHER


def load_default_teacher(map_location: Any = "cpu") -> Classifier:
    """The shipped WRN-16-2 FMNIST-32 teacher; :class:`ZooError` when it has not been trained yet."""
    path = default_teacher_path()
    if not path.is_file():
        raise ZooError(
            f"the default teacher {path} is not present (it is trained by the project's teacher pipeline and "
            "not shipped in this checkout); pass a teacher checkpoint explicitly"
        )
    return load_classifier(path, map_location=map_location)
