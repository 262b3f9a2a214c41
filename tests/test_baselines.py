"""The baselines users run today, as their papers and public code define them: Fast and CMI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synth.core.hooks import BatchNormStatisticsHook
from synth.core.losses import bn_statistics_loss
from synth.core.updates import term
from synth.methods.cmi import CMI, CMIConfig, contrastive_instance_loss
from synth.methods.fast import Fast, FastConfig

TINY = dict(batch_size=8, kd_steps=1, proxy_student="resnet8", latent_dim=16, generator_width=8,
            memory_capacity=32)


@pytest.fixture(scope="module")
def teacher(calibrated_teacher):
    return calibrated_teacher


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_fast_meta_generator_moves_by_exactly_the_reptile_update_of_its_fast_copy(teacher):
    torch.manual_seed(0)
    method = Fast(teacher, FastConfig(**TINY, inversion_steps=3, warmup=0), torch.device("cpu"))
    before = _params(method.generator)
    next(method.synthesize())
    adapted = _params(method.fast_generator)  # theta' after k steps (re-copied only at the next batch)
    after = _params(method.generator)
    # The reference: one Adam step (the meta optimiser's settings) on g = theta - theta'.
    reference = [p.clone().requires_grad_(True) for p in before]
    optimizer = torch.optim.Adam(reference, lr=method.config.generator_lr * 3, betas=(0.5, 0.999))
    for p, fast in zip(reference, adapted, strict=True):
        p.grad = p.detach() - fast
    optimizer.step()
    for got, want in zip(after, reference, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # the meta generator learnt
    assert any(not torch.equal(a, b) for a, b in zip(after, adapted, strict=True))  # but is not the copy
    assert any(not torch.equal(a, b) for a, b in zip(adapted, before, strict=True))  # the copy adapted


def test_fast_switches_the_adversarial_term_on_after_its_warmup(teacher):
    torch.manual_seed(0)
    method = Fast(teacher, FastConfig(**TINY, inversion_steps=1, warmup=2), torch.device("cpu"))
    stream = method.synthesize()
    seen = []
    for _ in range(4):
        next(stream)
        seen.append("adv" in method.losses_of_last_step())
    assert seen == [False, False, True, True]


def test_momentum_bn_loss_blends_running_synthetic_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    hook = BatchNormStatisticsHook(net)
    x = torch.randn(16, 3, 8, 8)
    with hook.recording():
        net(x)
    h = net[0](x).detach()
    mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    run_mean, run_var = torch.randn(4), torch.rand(4) + 0.5
    m = 0.9
    expected = (torch.linalg.vector_norm((1 - m) * mean + m * run_mean - net[1].running_mean)
                + torch.linalg.vector_norm((1 - m) * var + m * run_var - net[1].running_var))
    got = bn_statistics_loss(hook, [(run_mean, run_var)], m)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert bn_statistics_loss(hook).item() != pytest.approx(got.item(), rel=1e-3)


def test_fast_keeps_its_running_synthetic_statistics_across_a_resume(teacher):
    torch.manual_seed(0)
    method = Fast(teacher, FastConfig(**TINY, inversion_steps=1), torch.device("cpu"))
    stream = method.synthesize()
    next(stream)
    next(stream)
    restored = Fast(teacher, FastConfig(**TINY, inversion_steps=1), torch.device("cpu"))
    restored.load_state_dict(method.state_dict())
    for (a_mean, a_var), (b_mean, b_var) in zip(method.synthetic_stats, restored.synthetic_stats, strict=True):
        assert torch.equal(a_mean, b_mean) and torch.equal(a_var, b_var)
    assert restored.meta_optimizer.state_dict()["state"]


def test_cmi_yields_the_best_iterate_not_the_last(teacher, monkeypatch):
    """CMI's real objective plus a constant per step that makes the total fall, then rise: the batch must be
    the images of the lowest step, which the real updates have since changed."""
    torch.manual_seed(0)
    method = CMI(teacher, CMIConfig(**TINY, inversion_steps=4), torch.device("cpu"))
    offsets = iter([3000.0, 1000.0, 2000.0, 5000.0])
    images_at_step = []
    real_losses = method.losses

    def toy_losses(step):
        images_at_step.append(step.images.detach().clone())
        terms = real_losses(step)
        terms["offset"] = term(step.images.mean() * 0 + next(offsets), "generator", "latents")
        return terms

    monkeypatch.setattr(method, "losses", toy_losses)
    batch = next(method.synthesize())
    assert torch.equal(batch.images, images_at_step[1])
    assert not torch.equal(batch.images, images_at_step[-1])


def test_cmi_contrastive_loss_matches_a_hand_computed_value():
    local = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    global_ = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [1.0, 0.8]]), dim=1)
    tau = 0.5
    logits = local @ global_.t() / tau
    rows = [-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(3)]
    # two batch rows, one bank row: batch mean + bank mean
    expected = (rows[0] + rows[1]) / 2 + rows[2]
    assert contrastive_instance_loss(local, global_, 2, tau).item() == pytest.approx(expected.item(), rel=1e-6)
    assert contrastive_instance_loss(local, global_, 3, tau).item() == pytest.approx(
        (sum(rows) / 3).item(), rel=1e-6)


def test_cmi_reinitialises_the_generator_each_round_and_keeps_its_head_and_bank(teacher):
    torch.manual_seed(0)
    method = CMI(teacher, CMIConfig(**TINY, inversion_steps=2, bank_size=64, negatives=16), torch.device("cpu"))
    head_before = _params(method.head)
    stream = method.synthesize()
    next(stream)
    after_first = _params(method.generator)
    head_after_first = _params(method.head)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, head_after_first, strict=True))
    assert len(method.feature_bank) == 8 and "cr" in method.losses_of_last_step()
    method.begin_batch(method.next_labels())
    fresh = _params(method.generator)
    conv_and_linear = [i for i, p in enumerate(fresh) if p.dim() > 1]
    assert all(not torch.equal(fresh[i], after_first[i]) for i in conv_and_linear)
    assert all(abs(float(fresh[i].std()) - 0.02) < 0.01 for i in conv_and_linear)  # CMI's N(0, 0.02) reset
    next(stream)
    assert len(method.feature_bank) == 16
    assert method.head_optimizer.state_dict()["state"]  # one Adam for the head, kept across rounds


def test_deepinversion_yields_the_best_iterate_with_the_references_bn_weight(teacher, monkeypatch):
    """A constant per step makes the total fall, then rise: the batch is the images of the lowest step."""
    from synth.methods.deepinversion import DeepInversion, DeepInversionConfig

    assert DeepInversionConfig().bn_weight == 10  # NVlabs' paper command, Fast-Datafree's script
    torch.manual_seed(0)
    method = DeepInversion(teacher, DeepInversionConfig(batch_size=4, iterations=4), torch.device("cpu"))
    offsets = iter([3e6, 1e6, 2e6, 5e6])  # far above the real terms (a BN loss of a few hundred at batch 4)
    seen = []
    real_losses = method.losses

    def toy_losses(images, labels):
        seen.append(images.detach().clone())
        terms = real_losses(images, labels)
        terms["offset"] = images.mean() * 0 + next(offsets)
        return terms

    monkeypatch.setattr(method, "losses", toy_losses)
    batch = next(method.synthesize())
    assert torch.equal(batch.images, seen[1]) and not torch.equal(batch.images, seen[-1])
