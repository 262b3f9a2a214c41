"""Unit tests of the pieces methods share: the GMM prior, memory banks, InfoNCE and the other losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from synth.core.hooks import BatchNormStatisticsHook, MissingBatchNormError
from synth.core.losses import adversarial_kl_loss, bn_statistics_loss, info_nce_loss, total_variation_loss
from synth.core.memory import MemoryBank
from synth.core.priors import ClassConditionalGMM


def _set_gmm(gmm: ClassConditionalGMM, weights: list[float]) -> None:
    with torch.no_grad():
        gmm.means.zero_()
        gmm.means[1, 0] = torch.tensor([2.0, -1.0, 0.5])
        gmm.means[1, 1] = torch.tensor([-3.0, 1.0, 1.0])
        gmm.cholesky_offdiagonal.zero_()
        gmm.cholesky_offdiagonal[1, 0, 1, 0] = 0.8
        gmm.cholesky_offdiagonal[1, 0, 2, 1] = -0.5
        gmm.cholesky_offdiagonal[1, 1, 2, 0] = 0.3
        gmm.cholesky_offdiagonal[1, 0, 0, 2] = 99.0  # above the diagonal: must be ignored
        gmm.cholesky_log_diagonal.zero_()
        gmm.cholesky_log_diagonal[1, 0] = torch.log(torch.tensor([0.5, 1.0, 1.5]))
        gmm.cholesky_log_diagonal[1, 1] = torch.log(torch.tensor([1.2, 0.3, 0.7]))
        gmm.weight_logits.copy_(torch.log(torch.tensor([weights] * 2)))


@pytest.mark.parametrize("learnable", [True, False])
def test_gmm_samples_match_mixture_mean_and_covariance(learnable):
    torch.manual_seed(0)
    gmm = ClassConditionalGMM(num_classes=2, num_components=2, latent_dim=3, learnable_weights=learnable)
    weights = [0.3, 0.7] if learnable else [0.5, 0.5]
    _set_gmm(gmm, weights)
    n = 200_000
    with torch.no_grad():
        z = gmm.sample(torch.ones(n, dtype=torch.long)).double()
    pi = torch.tensor(weights, dtype=torch.float64)
    mu = gmm.means[1].double()
    cov = gmm.covariance()[1].double()
    mix_mean = (pi[:, None] * mu).sum(0)
    second = sum(pi[k] * (cov[k] + torch.outer(mu[k], mu[k])) for k in range(2))
    mix_cov = second - torch.outer(mix_mean, mix_mean)
    # Standard error of a mean is sqrt(var/n); allow 5 of them. Covariance entries: a looser 2% of scale.
    stderr = (mix_cov.diagonal() / n).sqrt()
    assert torch.all((z.mean(0) - mix_mean).abs() < 5 * stderr)
    assert torch.allclose(torch.cov(z.T), mix_cov, atol=0.05 * mix_cov.abs().max().item())


def test_gmm_scale_tril_is_lower_triangular_with_positive_diagonal():
    gmm = ClassConditionalGMM(num_classes=3, num_components=2, latent_dim=4)
    with torch.no_grad():
        gmm.cholesky_offdiagonal.normal_()
        gmm.cholesky_log_diagonal.normal_()
    scale = gmm.scale_tril()
    assert torch.all(torch.triu(scale, diagonal=1) == 0)
    assert torch.all(scale.diagonal(dim1=-2, dim2=-1) > 0)


def test_stage1_gradients_reach_means_cholesky_and_weights():
    torch.manual_seed(1)
    gmm = ClassConditionalGMM(num_classes=4, num_components=3, latent_dim=5, learnable_weights=True)
    with torch.no_grad():
        gmm.cholesky_offdiagonal.normal_(std=0.1)
    labels = torch.arange(4).repeat(16)
    target = torch.randn(5)
    z = gmm.sample(labels, relaxed=True)
    # Any loss of the samples, here one that depends on which component each sample came from.
    ((z - target) ** 2).sum().backward()
    for name in ("means", "cholesky_offdiagonal", "cholesky_log_diagonal", "weight_logits"):
        grad = getattr(gmm, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Only the strictly-lower part of the off-diagonal parameter is used, so only it gets gradient.
    upper = torch.triu(torch.ones(5, 5, dtype=torch.bool))
    assert gmm.cholesky_offdiagonal.grad[..., upper].abs().sum() == 0


def test_fixed_weights_are_uniform_and_not_trained():
    gmm = ClassConditionalGMM(num_classes=2, num_components=4, latent_dim=3, learnable_weights=False)
    assert torch.allclose(gmm.mixture_weights(), torch.full((2, 4), 0.25))
    assert "weight_logits" not in dict(gmm.named_parameters())


def test_memory_bank_is_bounded_and_first_in_first_out():
    bank = MemoryBank(capacity=5)
    assert bank.all() is None
    bank.push(torch.tensor([[0.0], [1.0], [2.0]]))
    assert bank.all().flatten().tolist() == [0, 1, 2]
    bank.push(torch.tensor([[3.0], [4.0], [5.0]]))
    assert len(bank) == 5
    assert bank.all().flatten().tolist() == [1, 2, 3, 4, 5]  # 0 left first
    bank.push(torch.arange(6.0, 13.0).unsqueeze(1))  # more than capacity at once
    assert bank.all().flatten().tolist() == [8, 9, 10, 11, 12]
    restored = MemoryBank(1)
    restored.load_state_dict(bank.state_dict())
    assert restored.capacity == 5 and restored.all().flatten().tolist() == [8, 9, 10, 11, 12]
    assert set(bank.sample(100).flatten().tolist()) <= {8, 9, 10, 11, 12}


def test_info_nce_known_value_on_hand_computed_case():
    # Two anchors on the axes; positives equal to them; one bank negative at 45 degrees.
    anchors = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 1.0]])
    tau = 0.5
    c = 1 / math.sqrt(2)
    # Row i: logits = [cos(a_i,p_0), cos(a_i,p_1), cos(a_i,bank)] / tau, target i.
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0) + math.exp(c / tau)))
    row1 = -math.log(math.exp(1 / tau) / (math.exp(0) + math.exp(1 / tau) + math.exp(c / tau)))
    value = info_nce_loss(anchors, positives, bank, temperature=tau)
    assert value.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # Without the bank the denominator loses that term.
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert info_nce_loss(anchors, positives, None, temperature=tau).item() == pytest.approx(expected, rel=1e-6)


def test_decision_adversarial_counts_only_agreeing_samples():
    teacher = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # agrees on the first sample only
    p = F.softmax(teacher, 1)
    kl = (p * (F.log_softmax(teacher, 1) - F.log_softmax(student, 1))).sum(1)
    assert adversarial_kl_loss(teacher, student).item() == pytest.approx(-kl.mean().item(), rel=1e-6)
    assert adversarial_kl_loss(teacher, student, decision_adversarial=True).item() == pytest.approx(
        -kl[0].item() / 2, rel=1e-6)
    # With the asked labels (a conditional generator), agreeing on another class does not count either.
    assert adversarial_kl_loss(teacher, student, decision_adversarial=True, labels=torch.tensor([0, 0])).item() == \
        pytest.approx(-kl[0].item() / 2, rel=1e-6)
    assert adversarial_kl_loss(teacher, student, decision_adversarial=True, labels=torch.tensor([1, 0])).item() == 0


def test_bn_statistics_loss_is_zero_on_matching_statistics_and_positive_otherwise():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net.eval()
    hook = BatchNormStatisticsHook(net)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        h = net[0](x)
        net[1].running_mean.copy_(h.mean((0, 2, 3)))
        net[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    with hook.recording():
        net(x)
    assert bn_statistics_loss(hook).item() == pytest.approx(0.0, abs=1e-5)
    with hook.recording():
        net(x * 2 + 1)
    assert bn_statistics_loss(hook).item() > 0.5
    net(x)  # outside recording: nothing is kept
    assert len(hook.batch_stats) == 1


def test_bn_hook_refuses_a_network_without_batchnorm():
    with pytest.raises(MissingBatchNormError, match="no BatchNorm"):
        BatchNormStatisticsHook(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)))


def test_total_variation_is_zero_on_constant_images():
    tv1, tv2 = total_variation_loss(torch.full((2, 3, 8, 8), 0.3))
    assert tv1.item() == 0 and tv2.item() == 0
