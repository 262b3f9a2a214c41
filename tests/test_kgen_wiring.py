"""K-Gen's wiring (issue 20): how the method calls its losses - each weight reaches its term, L_aed is alive and
uses r_o, L_ed uses r_i, the CAM is the asked class's, L_aed survives ``--adv-weight 0`` - the learnt
projection, re-estimated centres and the hinge's activity, the teacher-sized defaults and G's run-long Adam."""

from __future__ import annotations

import types

import pytest
import torch
from click.testing import CliRunner
from methodkit import built, first_step
from torch import nn

from synth.commands.cli import main
from synth.core.losses import distillation_loss
from synth.core.pixels import dequantise
from synth.methods.kgen import method as kgen_module
from synth.methods.kgen.cam import key_region_loss, target_mask
from synth.methods.kgen.embedding_diversity import EmbeddingProjection
from synth.methods.kgen.method import KGen, KGenConfig, KGenS, KGenSConfig

TINY = dict(batch_size=20, inversion_steps=2, kd_steps=2, proxy_student="resnet8", memory_capacity=64,
            latent_dim=16, generator_width=8, class_embedding="centre")


def _method(teacher, cls=KGenS, config_cls=KGenSConfig, batches: int = 1, **flags):
    return built(cls, config_cls(**{**TINY, **flags}), teacher, batches=batches, prepare=True)


def _step(method):
    return first_step(method)[1]


def test_every_weight_reaches_its_term(calibrated_teacher):
    method = _method(calibrated_teacher, outer_radius=0.5)  # L_aed's hinge active: a value to scale
    step = _step(method)
    base = method.losses(step)
    assert sorted(base) == ["adv", "aed", "bn", "cls", "kr"]
    assert all(float(t.value) != 0 for t in base.values())
    weights = {"cls": "class_weight", "bn": "bn_weight", "adv": "adv_weight", "kr": "kr_weight", "aed": "aed_weight"}
    for name, field in weights.items():
        setattr(method.config, field, 3 * getattr(method.config, field))
        tripled = method.losses(step)
        setattr(method.config, field, getattr(method.config, field) / 3)
        for other in base:  # exactly this term scales with its weight, the others stay
            factor = 3 if other == name else 1
            torch.testing.assert_close(tripled[other].value, factor * base[other].value, msg=f"{field} -> {other}")
        assert tripled[name].updates == {"generator", "noisy"}


def test_aed_is_the_outer_hinge_at_r_o_and_ed_the_inner_hinge_at_r_i(calibrated_teacher):
    # Radii given (distinct), both hinges active for every sample, so a dead or swapped term changes the value.
    method = _method(calibrated_teacher, inner_radius=0.001, outer_radius=0.5)
    step = _step(method)
    assert method.radii == (0.001, 0.5)
    embedded = nn.functional.normalize(method.projection.map(step.student_features), dim=1)
    mse = (embedded - method.representatives[step.labels]).pow(2).mean(1)
    assert bool((mse < 0.5).all())
    aed = method.losses(step)["aed"].value
    torch.testing.assert_close(aed, 5.0 * (0.5 - mse).mean())
    grads = torch.autograd.grad(aed, list(method.generator.parameters()), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)  # L_aed moves G
    assert method.aed_activity.fraction == 1.0
    images = dequantise(method.memory.sample(8))
    method.student.eval()
    with torch.no_grad():
        teacher_logits = method.teacher(images)
    logits, features = method.student.forward_with_features(images)
    inner = nn.functional.normalize(method.projection.map(features), dim=1)
    mse = (inner - method.representatives[teacher_logits.argmax(1)]).pow(2).mean(1)
    expected = distillation_loss(logits, teacher_logits, 4.0) + 10.0 * (mse - 0.001).clamp(min=0).mean()
    torch.testing.assert_close(method.proxy_student_loss(images), expected)


def test_key_region_loss_reads_the_cam_of_the_asked_class(calibrated_teacher, monkeypatch):
    method = _method(calibrated_teacher, batches=0)
    step = _step(method)
    n = step.labels.shape[0]
    feature_map = method.cam.feature_map[:n].detach().float()
    weights = method.cam.head.weight.detach()  # the teacher's classifier: W [classes, channels]
    by_hand = torch.stack([(weights[int(y)][:, None, None] * feature_map[i]).sum(0)
                           for i, y in enumerate(step.labels)])
    mask = target_mask(method.config.target_mask, by_hand.shape[1], by_hand.shape[2])
    torch.testing.assert_close(method.losses(step)["kr"].value, 0.1 * key_region_loss(by_hand, mask))
    # ... and it is the asked class's map, not another's: another label gives another value.
    other = torch.stack([(weights[(int(y) + 1) % 10][:, None, None] * feature_map[i]).sum(0)
                         for i, y in enumerate(step.labels)])
    assert abs(float(key_region_loss(other, mask)) - float(key_region_loss(by_hand, mask))) > 1e-3


def test_adv_weight_zero_keeps_aed(calibrated_teacher):
    method = _method(calibrated_teacher, batches=2, adv_weight=0.0)
    assert sorted(method.losses_of_last_step()) == ["aed", "bn", "cls", "kr"]


def test_projection_is_a_learnt_linear_map_even_when_the_sizes_agree(calibrated_teacher):
    assert isinstance(EmbeddingProjection(64, 64).map, nn.Linear)
    method = _method(calibrated_teacher, batches=0)  # resnet8 student, resnet8 teacher: 64 and 64
    learnt = {id(p) for g in method.student_optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in method.projection.parameters()} <= learnt


def test_centres_are_re_estimated_and_a_never_active_hinge_warns(calibrated_teacher):
    method = _method(calibrated_teacher, outer_radius=1e-9)
    first = method.representatives.clone()
    stream = method.synthesize()
    with pytest.warns(UserWarning, match="never active"):
        for _ in range(4):
            next(stream)
    assert not torch.allclose(first, method.representatives)  # the later batches moved the centres
    assert method.aed_activity.samples > 0 and method.aed_activity.fraction == 0.0


@pytest.mark.parametrize("size, kgen, kgen_s", [(32, "28,32", "28"), (28, "24,28", "24"), (224, "112,128", "112"),
                                                (64, "32,48", "32")])
def test_resolutions_and_memory_resolution_follow_the_teacher(size, kgen, kgen_s):
    teacher = types.SimpleNamespace(input_shape=(3, size, size))
    multi, single = KGenConfig(), KGenSConfig()
    KGen.fit_to_teacher(multi, teacher)
    KGenS.fit_to_teacher(single, teacher)
    assert (multi.resolutions, single.resolutions) == (kgen, kgen_s)
    assert multi.memory_resolution == single.memory_resolution == size
    assert max(multi.resolution_list()) <= size
    given = KGenConfig(resolutions="16", batch_sizes="", memory_resolution=40)
    given.fit_to(size)
    assert (given.resolutions, given.memory_resolution) == ("16", 40)  # what the user gives wins


def test_kgen_s_refuses_several_resolutions_and_its_help_says_what_runs():
    with pytest.raises(ValueError, match="one resolution"):
        KGenSConfig(resolutions="28,32")
    help_text = " ".join(CliRunner().invoke(main, ["run", "kgen-s", "--help"]).output.split())
    assert "unused by kgen-s" not in help_text and "the resolution's batch size" in help_text
    assert "random shift (4 px at 32) and flip" in help_text


def test_each_resolution_keeps_its_generators_adam(calibrated_teacher):
    method = _method(calibrated_teacher, cls=KGen, config_cls=KGenConfig, batches=3, resolutions="16,24",
                     batch_sizes="12,8")
    optimizers = method.kept_optimizers.optimizers
    assert sorted(optimizers) == ["generator@16", "generator@24"]
    steps = {int(s["step"]) for s in optimizers["generator@16"].state.values()}
    assert steps == {2 * method.config.inversion_steps}  # two 16-px batches, one Adam
    assert kgen_module.KGen.persistent_groups == ("generator",)  # Z's Adam is fresh with Z
