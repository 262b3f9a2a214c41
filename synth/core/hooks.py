"""Forward hooks that read a teacher's internals during synthesis.

Several methods need the batch statistics that a synthetic batch produces at each BatchNorm layer of the
teacher (DeepInversion, CMI, Fast, D2CIP Eq. 2, CPSC-DFKD). :class:`BatchNormStatisticsHook` collects them
once, for every method, while a context is active, so that evaluating the teacher for another purpose
(for example computing the stored logits) does not pay for or pollute them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn


class MissingBatchNormError(RuntimeError):
    """The teacher has no BatchNorm layer, so BN-statistics matching is impossible."""


class BatchNormStatisticsHook:
    """Records, for each BatchNorm layer of ``network``, the mean and variance of its input batch.

    The statistics are kept with their autograd graph, so a loss built from them (see
    :func:`synth.core.losses.bn_statistics_loss`) sends gradients back to the images and from there to a
    generator or latent codes. Recording happens only inside :meth:`recording`.
    """

    def __init__(self, network: nn.Module):
        self.layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.layers:
            raise MissingBatchNormError(
                "the teacher has no BatchNorm layers, so BN-statistics matching (the BN prior of "
                "DeepInversion / gMI / D2CIP) cannot be used; set the BN loss weight to 0 "
                "(e.g. --bn-weight 0) or choose a teacher with BatchNorm"
            )
        self.batch_stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.instance_means: list[torch.Tensor] = []
        self._active = False
        self._first: int | None = None
        self._instance_means = False
        self._batch_stats = True
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self._active:
            return
        # Only the first rows when several views share one forward pass (the teacher is in eval mode, so the
        # other rows do not change these rows' activations); float32 even under autocast.
        if self._instance_means:  # every row: each view's per-sample channel means (CMI's features)
            self.instance_means.append(inputs[0].float().mean(dim=list(range(2, inputs[0].dim()))))
        if not self._batch_stats:
            return
        x = inputs[0][: self._first].float()
        dims = [0] + list(range(2, x.dim()))
        # Population variance, as BatchNorm itself normalises with during training; one pass for both.
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        self.batch_stats.append((mean, var))

    @contextmanager
    def recording(self, first: int | None = None, instance_means: bool = False,
                  batch_stats: bool = True) -> Iterator[BatchNormStatisticsHook]:
        """Collects statistics for the forward passes run inside the ``with`` block: batch mean and variance
        of the first ``first`` samples of each batch (all of them when ``None``; ``batch_stats=False`` keeps
        those of an earlier recording), and with ``instance_means`` each sample's channel means at every
        layer (:meth:`instance_features`)."""
        if batch_stats:
            self.batch_stats = []
        self.instance_means = []
        self._active = True
        self._first = first
        self._instance_means = instance_means
        self._batch_stats = batch_stats
        try:
            yield self
        finally:
            self._active = False
            self._first = None
            self._instance_means = False
            self._batch_stats = True

    def instance_features(self) -> torch.Tensor:
        """[N, sum of channels]: every sample's per-channel means at the input of every BN layer, concatenated
        (CMI's multi-layer feature for instance discrimination)."""
        if not self.instance_means:
            raise RuntimeError("no instance means recorded: use recording(instance_means=True)")
        return torch.cat(self.instance_means, dim=1)

    def running_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The teacher's stored (running) mean and variance of every BN layer, in hook order."""
        return [(layer.running_mean, layer.running_var) for layer in self.layers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def recording(hook: BatchNormStatisticsHook | None, first: int | None = None, instance_means: bool = False,
              batch_stats: bool = True) -> AbstractContextManager:
    """``hook.recording(...)``, or a no-op when there is no hook."""
    return hook.recording(first, instance_means, batch_stats) if hook is not None else nullcontext()
