"""Mapping a foreign checkpoint's weights onto a zoo architecture.

Public DFKD checkpoints wrap their weights in many ways and name them after their own codebases; this module
finds the ``state_dict`` inside (under ``state_dict``, ``model``, ``net`` or ``model_state_dict``, with any
DataParallel ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix stripped), tells which zoo architectures
its parameter names and shapes fit, and builds the network from it with messages that name the missing and
unexpected keys. Nothing here reads a file: :mod:`zoo.loading` does that, with ``weights_only=True``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import ARCHITECTURES, build_model, canonical_arch
from .errors import ZooError

__all__ = ["extract_state_dict", "load_network", "matching_architectures"]

# Where a wrapping dict keeps the weights, in the order they are tried.
_WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")
# Prefixes added by nn.DataParallel / DistributedDataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint ``obj``, unwrapped and with training-time prefixes stripped."""
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


def load_network(
    path: Path,
    arch: str,
    state: dict[str, torch.Tensor],
    num_classes: int | None,
    num_classes_from: str,
    in_channels: int | None,
    in_channels_from: str,
) -> tuple[nn.Module, int, int]:
    """``arch`` built with the checkpoint's class count and input channels (checked against those stated) and
    ``state`` loaded strictly; ZooError naming missing/unexpected keys, shape mismatches and what would fit."""
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
