"""Class activation maps of a teacher (Zhou et al. 2016) and K-Gen's key-region loss (papers/k-gen.txt, Eq. 5-6).

For a network whose head is one linear layer over globally average-pooled convolutional features A [N, K, h, w],

    M(x, y) = sum_k w_k^y A_k(x)                                                           (Eq. 5)

is the CAM of class y on the feature grid (before any normalisation or upsampling, as K-Gen uses it), and
L_kr = sum_{h,w} max(0, M_target - M(x, y)) the hinge against a target mask (Eq. 6; averaged over the batch).

:class:`CamRecorder` finds A without knowing the architecture: while active it watches every torch call
(a ``TorchFunctionMode``) and keeps the input of the last global average pooling (``adaptive_avg_pool2d`` to
1x1, ``avg_pool2d`` over the whole map, or ``mean`` over the two spatial dimensions); it then checks that the
pooled map *is* the input of the classifier's last ``nn.Linear``. A head that is anything else (two linear
layers, pooling other than a global average, a ViT's token head) raises :class:`CamError` naming what the CAM
needs. The recorder rides on the teacher forward pass the inversion step runs anyway: no second pass.

Target masks (Table 20): ``G(i,j)`` a Gaussian with peak i and standard deviation j (in feature-grid cells)
centred on the grid; ``Full(n)`` the constant n. The paper's best and default is ``G(1,2)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from synth.errors import SynthError

_MASK = re.compile(r"^\s*(G|Full)\s*\(\s*([0-9.eE+-]+)\s*(?:,\s*([0-9.eE+-]+)\s*)?\)\s*$", re.IGNORECASE)


class CamError(SynthError):
    """The teacher has no class activation map (its head is not a linear layer over globally pooled features)."""


def parse_mask(spec: str) -> tuple[str, float, float]:
    """``"G(1,2)"`` -> ("gaussian", 1.0, 2.0); ``"Full(1)"`` -> ("full", 1.0, 0.0). Raises ValueError."""
    match = _MASK.match(spec)
    if not match:
        raise ValueError(f"target mask {spec!r} is neither G(peak,sigma) nor Full(value) (Table 20)")
    kind, first, second = match.group(1).lower(), float(match.group(2)), match.group(3)
    if kind == "g":
        if second is None or float(second) <= 0:
            raise ValueError(f"target mask {spec!r}: G(peak,sigma) needs a positive sigma")
        return "gaussian", first, float(second)
    if second is not None:
        raise ValueError(f"target mask {spec!r}: Full(value) takes one number")
    return "full", first, 0.0


def target_mask(spec: str, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """M_target [height, width] for a Table 20 spec: Gaussian exp(-d^2 / 2 sigma^2) * peak about the grid's
    centre ((h-1)/2, (w-1)/2), or a constant."""
    kind, value, sigma = parse_mask(spec)
    if kind == "full":
        return torch.full((height, width), value, device=device)
    rows = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    cols = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    dist2 = rows[:, None] ** 2 + cols[None, :] ** 2
    return value * torch.exp(-dist2 / (2 * sigma**2))


def class_activation_map(feature_map: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 5: M[n] = sum_k W[labels[n], k] * A[n, k] for A [N, K, h, w] and the classifier's W [C, K]."""
    rows = class_weights[labels].to(feature_map.dtype)  # [N, K]
    return torch.einsum("nk,nkhw->nhw", rows, feature_map)


def key_region_loss(cam: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 6: sum over the grid of max(0, M_target - M), averaged over the batch (the sum over pixels is the
    paper's; the batch mean keeps alpha_kr independent of the batch size)."""
    return F.relu(target.to(cam.dtype) - cam).flatten(1).sum(dim=1).mean()


def _last_linear(network: nn.Module) -> nn.Linear | None:
    found = None
    for module in network.modules():
        if isinstance(module, nn.Linear):
            found = module
    return found


class _PoolWatcher(TorchFunctionMode):
    """Keeps the input of the most recent global average pooling of a 4-D tensor run while ``inside()``."""

    def __init__(self, inside) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.inside = inside
        self.pooled_input: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        x = args[0] if args else None
        if (self.inside() and isinstance(x, torch.Tensor) and x.dim() == 4
                and _is_global_average(func, x, args, kwargs)):
            self.pooled_input = x
        return out


def _is_global_average(func, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:  # type: ignore[no-untyped-def]
    name = getattr(func, "__name__", "")
    if name == "adaptive_avg_pool2d":
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if name == "avg_pool2d":
        kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel or ())
        return kernel == tuple(x.shape[2:])
    if name == "mean":
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        return sorted(d % 4 for d in dims) == [2, 3]
    return False


class CamRecorder:
    """Reads a classifier's last convolutional feature map during its forward pass and turns it into CAMs.

    ``network`` is the bare network (``zoo.Classifier.network``). Use :meth:`recording` around the forward
    pass, then :meth:`cam` with the asked labels. Only ``network``'s own forward pass is watched: other
    networks run inside the block (the proxy student) leave the record alone.
    """

    def __init__(self, network: nn.Module, arch: str = ""):
        self.arch = arch or type(network).__name__
        self.head = _last_linear(network)
        if self.head is None:
            raise CamError(self._needs("it has no nn.Linear layer"))
        self.feature_map: torch.Tensor | None = None
        self._head_input: torch.Tensor | None = None
        self._active = self._inside = False
        self._handles = [self.head.register_forward_pre_hook(self._grab),
                         network.register_forward_pre_hook(lambda *_: self._enter()),
                         network.register_forward_hook(lambda *_: self._leave())]

    def _enter(self) -> None:
        self._inside = self._active

    def _leave(self) -> None:
        self._inside = False

    def _needs(self, found: str) -> str:
        return (f"the key-region loss needs the teacher's class activation map: its last convolutional feature map "
                f"globally average-pooled into one nn.Linear classifier (logits = W avgpool(A) + b); {self.arch}: "
                f"{found}. Use --no-key-region (or --kr-weight 0), or a CNN teacher with such a head")

    def _grab(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self._active:
            self._head_input = inputs[0]

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Records the feature map of the forward pass run inside the block (kept in :attr:`feature_map`)."""
        watcher = _PoolWatcher(lambda: self._inside)
        self._active, self._head_input, self.feature_map = True, None, None
        try:
            with watcher:
                yield
        finally:
            self._active = self._inside = False
        self.feature_map = self._check(watcher.pooled_input, self._head_input)

    def _check(self, pooled: torch.Tensor | None, head_input: torch.Tensor | None) -> torch.Tensor:
        if head_input is None:
            raise CamError(self._needs("its last nn.Linear did not run in the forward pass"))
        if pooled is None:
            raise CamError(self._needs("no global average pooling of a 4-D feature map was found"))
        flat = head_input.reshape(head_input.shape[0], -1)
        if flat.shape[1] != pooled.shape[1] or flat.shape[0] != pooled.shape[0]:
            raise CamError(self._needs(f"the classifier reads {flat.shape[1]} features, the last pooled map has "
                                       f"{pooled.shape[1]} channels"))
        mean = pooled.detach().float().mean(dim=(2, 3))
        # Under autocast the pooled value is rounded to bf16/fp16 (2^-8 relative for bf16): the tolerance follows
        # the coarser of the two dtypes, never tighter than fp32's 1e-3.
        eps = max(torch.finfo(t.dtype).eps for t in (pooled, flat) if t.is_floating_point())
        rtol = max(1e-3, 4 * eps)
        if not torch.allclose(mean, flat.detach().float(), rtol=rtol, atol=rtol * (1 + mean.abs().max().item())):
            raise CamError(self._needs("the classifier's input is not the global average of the last feature map "
                                       "(something sits between the pooling and the linear layer)"))
        return pooled

    def cam(self, labels: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Eq. 5 for the recorded pass: [N, h, w] for the first ``rows`` samples (all by default)."""
        if self.feature_map is None:
            raise RuntimeError("CamRecorder.cam needs a forward pass inside recording()")
        feature_map = self.feature_map if rows is None else self.feature_map[:rows]
        return class_activation_map(feature_map.float(), self.head.weight.float(), labels)

    def grid_size(self) -> tuple[int, int]:
        if self.feature_map is None:
            raise RuntimeError("no feature map recorded yet")
        return int(self.feature_map.shape[2]), int(self.feature_map.shape[3])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def cam_grid(network: nn.Module, image_shape: tuple[int, int, int], device: torch.device | str = "cpu",
             arch: str = "") -> tuple[int, int]:
    """The CAM's grid size for images of ``image_shape`` (C, H, W): one dry forward pass, no gradient. Raises
    :class:`CamError` for a network without a CAM."""
    recorder = CamRecorder(network, arch)
    try:
        was_training = network.training
        network.eval()
        with torch.no_grad(), recorder.recording():
            network(torch.zeros(1, *image_shape, device=device))
        network.train(was_training)
        return recorder.grid_size()
    finally:
        recorder.close()

