"""Fast and CMI as their methods call their losses: what the teacher is shown, what reaches the BN loss, the
running statistics' EMA, the contrastive bank's layout, the groups L_cr updates, and the proxy student's
schedule. Each test is named in tests/README.md beside the mutation it catches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from methodkit import built, first_step

from synth.core import augment
from synth.core.proxy import scheduled_lr
from synth.methods import cmi as cmi_module
from synth.methods import fast as fast_module
from synth.methods.cmi import CMI, CMIConfig, contrastive_instance_loss
from synth.methods.fast import Fast, FastConfig

TINY = dict(batch_size=8, kd_steps=1, proxy_student="resnet8", latent_dim=16, generator_width=8,
            memory_capacity=32)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher(calibrated_teacher):
    return calibrated_teacher


def _is_shift_flip(view: torch.Tensor, image: torch.Tensor, max_shift: int = 4) -> bool:
    """Whether ``view`` is ``image`` moved by at most ``max_shift`` pixels (and maybe mirrored): compared away
    from the border, where the zero padding shows."""
    inner = (slice(None), slice(max_shift, -max_shift), slice(max_shift, -max_shift))
    for flip in (False, True):
        source = image.flip(-1) if flip else image
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                if torch.equal(view[inner], torch.roll(source, (dy, dx), (1, 2))[inner]):
                    return True
    return False


def _teacher_inputs(method, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(generated images, what the teacher's inversion forward received) for every step that follows."""
    seen, generated = [], []
    real_generate, real_forward = method.generate, method.teacher.forward_with_features

    def generate(latents, labels):
        images = real_generate(latents, labels)
        generated.append(images.detach().clone())
        return images

    def forward_with_features(batch):
        seen.append((generated[-1], batch.detach().clone()))
        return real_forward(batch)

    monkeypatch.setattr(method, "generate", generate)
    monkeypatch.setattr(method.teacher, "forward_with_features", forward_with_features)
    return seen


# -- Fast ---------------------------------------------------------------------------------------------------

def test_fast_shows_the_teacher_shifted_and_flipped_images(teacher, monkeypatch):
    torch.manual_seed(0)
    method = Fast(teacher, FastConfig(**TINY, inversion_steps=2), CPU)
    seen = _teacher_inputs(method, monkeypatch)
    next(method.synthesize())
    assert len(seen) == 2
    for images, view in seen:
        assert not torch.equal(view, images)
        assert all(_is_shift_flip(v, x) for v, x in zip(view, images, strict=True))


def test_fast_running_statistics_weigh_the_past_by_m(teacher, monkeypatch):
    """running <- m * running + (1 - m) * the batch's last-step statistics (the public code's bn_mmt)."""
    torch.manual_seed(0)
    method = Fast(teacher, FastConfig(**TINY, inversion_steps=1, bn_momentum=0.9), CPU)
    stream = method.synthesize()
    next(stream)
    past = [(mean.clone(), var.clone()) for mean, var in method.synthetic_stats]
    last = []
    real = method.after_inversion

    def after_inversion(images, labels):
        last.append([(mean.detach().clone(), var.detach().clone()) for mean, var in method.bn_hook.batch_stats])
        real(images, labels)

    monkeypatch.setattr(method, "after_inversion", after_inversion)
    next(stream)
    for (run_mean, run_var), (old_mean, old_var), (mean, var) in zip(method.synthetic_stats, past, last[0],
                                                                     strict=True):
        torch.testing.assert_close(run_mean, 0.9 * old_mean + 0.1 * mean)
        torch.testing.assert_close(run_var, 0.9 * old_var + 0.1 * var)
        assert not torch.allclose(mean, old_mean)  # two different batches, so the weights are told apart


def test_fast_bn_term_is_computed_with_the_running_statistics(teacher, monkeypatch):
    torch.manual_seed(0)
    method = Fast(teacher, FastConfig(**TINY, inversion_steps=2, bn_momentum=0.9), CPU)
    stream = method.synthesize()
    next(stream)
    running = method.synthetic_stats
    calls = []
    real = fast_module.bn_statistics_loss

    def spy(hook, synthetic_running=None, momentum=0.0):
        calls.append((synthetic_running, momentum))
        return real(hook, synthetic_running, momentum)

    monkeypatch.setattr(fast_module, "bn_statistics_loss", spy)
    next(stream)
    assert len(calls) == 2 and all(r is running and m == 0.9 for r, m in calls)


# -- CMI ----------------------------------------------------------------------------------------------------

def _cmi_after(teacher, batches: int = 1, **options) -> CMI:
    return built(CMI, CMIConfig(**{**TINY, "inversion_steps": 1, "bank_size": 64, "negatives": 16, **options}),
                 teacher, batches=batches)


def _cmi_step(method: CMI):
    groups, step = first_step(method, needs_student=method.proxy_has_learnt)
    return groups, step, method.losses(step)


def test_cmi_global_view_is_a_shifted_flipped_image_and_the_local_view_a_crop(teacher, monkeypatch):
    method = _cmi_after(teacher, batches=0, inversion_steps=2)
    seen = _teacher_inputs(method, monkeypatch)
    next(method.synthesize())
    for images, both in seen:
        global_view, local_view = both.chunk(2)  # one fused forward: global rows first
        assert not torch.equal(global_view, images) and not torch.equal(local_view, images)
        assert all(_is_shift_flip(v, x) for v, x in zip(global_view, images, strict=True))


def test_cmi_local_crops_have_aspect_ratios_from_3_4_to_4_3(teacher):
    method = _cmi_after(teacher, batches=0)
    ramps = torch.zeros(256, 3, 32, 32)
    ramps[:, 0] = torch.linspace(0, 1, 32).view(1, 32)  # x coordinate
    ramps[:, 1] = torch.linspace(0, 1, 32).view(32, 1)  # y coordinate
    torch.manual_seed(0)
    _, local = method.make_views(ramps)
    width = (local[:, 0, 16, -1] - local[:, 0, 16, 0]).abs()  # the crop's share of the image, per axis
    height = (local[:, 1, -1, 16] - local[:, 1, 0, 16]).abs()
    aspect = width / height
    assert aspect.min() > 0.75 - 0.02 and aspect.max() < 4 / 3 + 0.02
    assert (aspect - 1).abs().max() > 0.2  # not only squares
    square = augment.random_resized_crop_flip(ramps)  # the default stays square for other methods
    ratio = (square[:, 0, 16, -1] - square[:, 0, 16, 0]).abs() / (square[:, 1, -1, 16] - square[:, 1, 0, 16]).abs()
    torch.testing.assert_close(ratio, torch.ones(256), rtol=0, atol=0.02)  # edge pixels sample the reflection


def test_cmi_contrast_treats_the_global_side_as_a_fixed_target():
    local = torch.randn(6, 4, requires_grad=True)
    global_ = torch.randn(6, 4, requires_grad=True)
    loss = contrastive_instance_loss(F.normalize(local, dim=1), F.normalize(global_, dim=1), 4, 0.2)
    grad_local, grad_global = torch.autograd.grad(loss, [local, global_], allow_unused=True)
    assert grad_global is None and grad_local.abs().sum() > 0


def test_cmi_bank_stores_local_then_global_and_losses_read_it_so(teacher, monkeypatch):
    method = _cmi_after(teacher, batches=0)
    dim = method.head.net[0].in_features
    global_rows, local_rows = torch.randn(8, dim), torch.randn(8, dim)
    method.on_new_best(SimpleNamespace(instance_features=[global_rows, local_rows]))
    method.after_inversion(torch.empty(0), torch.empty(0))
    assert torch.equal(method.feature_bank.all(), torch.cat([local_rows, global_rows], dim=1))
    method.memory.push(torch.zeros(8, 3, 32, 32, dtype=torch.uint8))  # so a step can run
    heads_input = []
    method.head.register_forward_hook(lambda module, args, out: heads_input.append(args[0].detach()))
    _cmi_step(method)
    rows = heads_input[-1]  # [batch local | bank local | batch global | bank global]
    n, k = 8, 8
    bank_local, bank_global = rows[n:n + k], rows[2 * n + k:]
    for a, b in zip(bank_local, bank_global, strict=True):
        j = next(i for i in range(8) if torch.equal(a, local_rows[i]))
        assert torch.equal(b, global_rows[j])  # the same instance's global side, on the global side


def test_cmi_contrast_updates_generator_latents_and_head(teacher, engine_gradients):
    """Declared groups, and the generator's gradient is that of every term, L_cr included."""
    method = _cmi_after(teacher, batches=1)
    groups, _, terms = _cmi_step(method)
    assert set(terms["cr"].updates) == {"generator", "latents", "head"}
    total = sum(t.value for t in terms.values())
    want = torch.autograd.grad(total, groups["generator"].params, retain_graph=True)
    without_cr = sum(t.value for name, t in terms.items() if name != "cr")
    other = torch.autograd.grad(without_cr, groups["generator"].params, retain_graph=True)
    captured = engine_gradients(method.engine, terms, groups)
    for got, w in zip(captured["generator"], want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(w, o) for w, o in zip(want, other, strict=True))



def test_cmi_without_contrast_shows_the_teacher_the_global_view_only_as_the_reference_cr_0(teacher, monkeypatch):
    """The reference's short setting (g_steps 5, --cr 0): one teacher view of the batch's own size per step,
    no L_cr, no head update, nothing pushed to the bank."""
    method = _cmi_after(teacher, batches=0, inversion_steps=2, contrast_weight=0.0)
    seen = _teacher_inputs(method, monkeypatch)
    next(method.synthesize())
    assert len(seen) == 2 and all(len(batch) == len(images) for images, batch in seen)
    assert all(_is_shift_flip(v, x) for images, batch in seen for v, x in zip(batch, images, strict=True))
    assert "cr" not in method.losses_of_last_step() and len(method.feature_bank) == 0
    groups, step, terms = _cmi_step(method)
    assert "head" not in groups and step.instance_features is None and "cr" not in terms

# -- the proxy student's schedule ---------------------------------------------------------------------------

def test_cosine_schedule_is_torchs_cosine_annealing():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10, eta_min=2e-4)
    for step in range(15):
        assert scheduled_lr(0.2, "cosine", step, 10) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()
    assert scheduled_lr(0.2, "constant", 7, 10) == 0.2


@pytest.mark.parametrize("method_class, config_class, warmup", [(Fast, FastConfig, 2), (CMI, CMIConfig, 0)])
def test_proxy_learning_rate_follows_the_schedule_per_stored_batch(teacher, method_class, config_class, warmup,
                                                                   monkeypatch):
    options = dict(TINY, inversion_steps=1, proxy_lr=0.2, proxy_schedule="cosine", proxy_schedule_batches=4)
    if method_class is Fast:
        options["warmup"] = warmup
    else:
        options.update(bank_size=64, negatives=8)
    torch.manual_seed(0)
    method = method_class(teacher, config_class(**options), CPU)
    rates = []
    real = method._proxy_kd_steps
    monkeypatch.setattr(method, "_proxy_kd_steps",
                        lambda: (rates.append(method.student_optimizer.param_groups[0]["lr"]), real())[1])
    stream = method.synthesize()
    for _ in range(5):
        next(stream)
    steps = [max(0, b - warmup) for b in range(5)]  # Fast holds the rate through its warm-up, as the reference
    assert rates == pytest.approx([2e-4 + (0.2 - 2e-4) * (1 + math.cos(math.pi * s / 4)) / 2 for s in steps])


def test_paper_presets_train_the_proxy_as_the_reference_trains_its_student():
    for config, lr in ((FastConfig(), 0.2), (CMIConfig(), 0.1)):
        assert (config.kd_steps, config.kd_temperature, config.proxy_lr, config.proxy_schedule,
                config.proxy_schedule_batches) == (400, 20.0, lr, "cosine", 200)
    for config_class in (FastConfig, CMIConfig):  # the CPU rows' measured setting
        budget = config_class.own_cpu_budget()
        assert (budget["kd_steps"], budget["kd_temperature"], budget["proxy_lr"], budget["proxy_schedule"]) == (
            5, 4.0, 0.1, "constant")
    assert cmi_module.LOCAL_RATIO == (3 / 4, 4 / 3)
