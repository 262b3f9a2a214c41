"""Loading and saving classifier checkpoints safely.

:func:`load_classifier` turns a checkpoint file into a :class:`~zoo.Classifier`. It accepts

* a plain ``state_dict`` (name the architecture with ``arch=`` or a card);
* a dict holding one under ``state_dict`` (Fast-Datafree, CMI, NAYER), ``model`` (RepDistiller),
  ``net`` or ``model_state_dict``, with any DataParallel ``module.`` (or ``torch.compile``
  ``_orig_mod.``) prefix stripped;
* a TorchScript archive (``torch.jit.save``), which carries its own architecture.

A checkpoint is untrusted input: files are read with ``torch.load(..., weights_only=True)``, which
unpickles tensors and plain containers only (plus ``argparse.Namespace`` and numpy scalars, which
training scripts often store beside the weights). A file that would need arbitrary Python objects is
refused with :class:`~zoo.ZooError`; it is never retried with ``weights_only=False``.

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
import functools
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

from atomicio import write_atomic

from .architectures import ARCHITECTURES, build_model, canonical_arch
from .card import DEFAULT_MEAN, DEFAULT_STD, TeacherCard, card_path_for, read_card_dict
from .classifier import Classifier, is_torchscript
from .errors import NormalizationWarning, ZooError

__all__ = ["load_classifier", "save_classifier", "default_teacher_path", "load_default_teacher"]

PathLike = str | os.PathLike[str]

# Where a wrapping dict keeps the weights, in the order they are tried.
_WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")
# Prefixes added by nn.DataParallel / DistributedDataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
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


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # wrappers can nest, e.g. {"model": {"state_dict": ...}}
        if _is_state_dict(obj):
            break
        if not isinstance(obj, dict):
            raise ZooError(f"{path} holds a {type(obj).__name__}, not a state_dict or a dict holding one")
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            keys = ", ".join(map(repr, list(obj)[:10]))
            raise ZooError(
                f"{path} holds a dict with keys {keys} but no state_dict; expected a state_dict or a dict "
                f"holding one under {', '.join(map(repr, _WRAPPER_KEYS))}"
            )
        obj = inner
    if not _is_state_dict(obj):
        raise ZooError(f"{path}: no state_dict found (nested too deep or holding non-tensor values)")
    state = dict(obj)
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


@functools.cache
def _arch_signature(arch: str) -> tuple[dict[str, tuple[int, ...]], str | None, str | None]:
    """Parameter shapes (at 10 classes, 3 channels), first-conv and last-Linear weight keys of ``arch``."""
    try:
        with torch.device("meta"):  # shapes only, no memory or init cost
            model = build_model(arch, 10, 3)
    except Exception:
        model = build_model(arch, 10, 3)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    last_linear = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last_linear = n
    return (
        shapes,
        None if first_conv is None else f"{first_conv}.weight",
        None if last_linear is None else f"{last_linear}.weight",
    )


def _comparable_keys(keys: Any) -> set[str]:
    # Checkpoints from PyTorch < 0.4.1 lack num_batches_tracked; BatchNorm fills it in when loading.
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def _shapes_fit(arch: str, state: dict[str, torch.Tensor]) -> bool:
    shapes, first_conv, last_linear = _arch_signature(arch)
    last_bias = None if last_linear is None else last_linear[: -len("weight")] + "bias"
    for key, shape in shapes.items():
        if key not in state:
            continue
        got = tuple(state[key].shape)
        if len(got) != len(shape):
            return False
        # The class count and input channels vary between checkpoints of the same architecture.
        free = {1} if key == first_conv else {0} if key in (last_linear, last_bias) else set()
        if any(g != s for i, (g, s) in enumerate(zip(got, shape, strict=True)) if i not in free):
            return False
    return True


def matching_architectures(state: dict[str, torch.Tensor]) -> list[str]:
    """Registry architectures whose parameter names (and shapes, up to classes/channels) fit ``state``.

    Architectures that match names and shapes come first, then those that match names only.
    """
    keys = _comparable_keys(state)
    exact, names_only = [], []
    for arch in ARCHITECTURES:
        if _comparable_keys(_arch_signature(arch)[0]) == keys:
            (exact if _shapes_fit(arch, state) else names_only).append(arch)
    return exact + names_only


def _mismatch_message(path: Path, arch: str, expected: set[str], got: set[str], state: dict) -> str:
    missing = sorted(expected - got)
    unexpected = sorted(got - expected)
    parts = [f"{path} does not fit architecture '{arch}'"]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        parts.append(f"missing keys: {', '.join(missing[:5])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        parts.append(f"unexpected keys: {', '.join(unexpected[:5])}{more}")
    candidates = [a for a in matching_architectures(state) if a != arch]
    if candidates:
        parts.append(f"architectures whose keys match this checkpoint: {', '.join(candidates)}")
    else:
        parts.append("no zoo architecture matches its keys")
    return "; ".join(parts)


def _load_network(
    path: Path,
    arch: str,
    state: dict[str, torch.Tensor],
    num_classes: int | None,
    num_classes_from: str,
    in_channels: int | None,
    in_channels_from: str,
) -> tuple[nn.Module, int, int]:
    arch = canonical_arch(arch)
    _, first_conv, last_linear = _arch_signature(arch)

    classes_in_ckpt = None
    if last_linear in state and state[last_linear].dim() == 2:
        classes_in_ckpt = int(state[last_linear].shape[0])
    if num_classes is not None and classes_in_ckpt is not None and num_classes != classes_in_ckpt:
        raise ZooError(f"{path}: checkpoint has {classes_in_ckpt} classes, {num_classes_from} {num_classes}")
    channels_in_ckpt = None
    if first_conv in state and state[first_conv].dim() == 4:
        channels_in_ckpt = int(state[first_conv].shape[1])
    if in_channels is not None and channels_in_ckpt is not None and in_channels != channels_in_ckpt:
        raise ZooError(
            f"{path}: checkpoint's first convolution takes {channels_in_ckpt} input channels, "
            f"{in_channels_from} {in_channels}"
        )
    num_classes = num_classes or classes_in_ckpt or 10
    in_channels = in_channels or channels_in_ckpt or 3

    model = build_model(arch, num_classes, in_channels)
    expected = _comparable_keys(model.state_dict())
    got = _comparable_keys(state)
    if expected != got:
        raise ZooError(_mismatch_message(path, arch, expected, got, state))
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {model_shapes[k]}"
        for k in sorted(got)
        if tuple(state[k].shape) != model_shapes[k]
    ]
    if wrong:
        candidates = [a for a in matching_architectures(state) if a != arch]
        hint = f"; architectures that fit: {', '.join(candidates)}" if candidates else ""
        raise ZooError(
            f"{path} does not fit architecture '{arch}' ({num_classes} classes, {in_channels} channels): "
            f"shape mismatch (checkpoint vs model) for {'; '.join(wrong[:5])}{hint}"
        )
    model.load_state_dict(state, strict=True)
    return model, num_classes, in_channels


def _first_param_device(network: nn.Module) -> torch.device:
    for tensor in network.state_dict().values():
        return tensor.device
    return torch.device("cpu")


def _load_torchscript(
    path: Path,
    map_location: Any,
    num_classes: int | None,
    num_classes_from: str,
    in_channels: int | None,
    input_size: int,
) -> tuple[nn.Module, int, int]:
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated; the user chose this format, so the warning is noise here.
            warnings.simplefilter("ignore", FutureWarning)
            network = torch.jit.load(str(path), map_location=map_location)
    except Exception as exc:
        raise ZooError(f"cannot load TorchScript archive {path}: {type(exc).__name__}: {exc}") from exc
    network.eval()
    if in_channels is None:
        first_4d = next((v for v in network.state_dict().values() if v.dim() == 4), None)
        in_channels = int(first_4d.shape[1]) if first_4d is not None else 3
    # TorchScript hides the layer types, so the class count comes from one trial forward pass.
    probe = torch.full((1, in_channels, input_size, input_size), 0.5, device=_first_param_device(network))
    try:
        with torch.no_grad():
            out = network(probe)
    except Exception as exc:
        raise ZooError(
            f"TorchScript model {path} does not run on a 1x{in_channels}x{input_size}x{input_size} input "
            f"({type(exc).__name__}); pass in_channels/input_size or add a card"
        ) from exc
    logits = out if isinstance(out, torch.Tensor) else out[0]
    classes = int(logits.shape[-1])
    if num_classes is not None and num_classes != classes:
        raise ZooError(f"{path}: checkpoint has {classes} classes, {num_classes_from} {num_classes}")
    return network, classes, in_channels


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
) -> Classifier:
    """The classifier stored at ``path``, in eval mode, with its card (sha256 of the file included).

    Explicit arguments override the card beside the checkpoint (``X.card.json``); the number of classes
    and input channels are read from the weights when neither gives them, and must agree with them
    when given. Raises :class:`ZooError` for a missing file, an unknown or unstated architecture, a
    checkpoint that does not fit the architecture (naming missing/unexpected keys and the architectures
    that would fit), a class-count mismatch, or a file that needs pickled code to load.
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
        size_value = choose("input_size", input_size)[0] or 32
        network, classes, channels = _load_torchscript(
            path, map_location, classes_value, classes_from, channels_value, int(size_value)
        )
        arch_name = str(arch_value) if arch_value else "torchscript"
    else:
        state = _extract_state_dict(_torch_load(path, map_location), path)
        if not arch_value:
            candidates = matching_architectures(state)
            hint = f" (architectures whose keys match: {', '.join(candidates)})" if candidates else ""
            raise ZooError(
                f"{path} is a plain state_dict and says nothing about its architecture; pass --arch NAME"
                f"{hint} or add a card {card_file.name} beside it"
            )
        network, classes, channels = _load_network(
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
        write_atomic(path, lambda tmp: torch.save(cpu_state, tmp))
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
