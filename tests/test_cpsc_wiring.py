"""CPSC-DFKD's wiring (issue 20): the replay memory keeps the asked labels and the proxy student learns from them,
alpha and T reach L_IKD, the generator *and its Adam* persist across batches (and through a resume), the
per-channel CFE option, and every method's config refuses a negative loss weight."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from methodkit import built

from synth.commands.cli import main
from synth.core import registry
from synth.core.generators import ConditionalDCGANGenerator
from synth.core.losses import distillation_loss, supervised_contrastive_loss
from synth.core.pixels import dequantise, quantise
from synth.methods.cpsc import CPSC, CPSCConfig

TINY = dict(batch_size=8, inversion_steps=2, kd_steps=2, proxy_student="resnet8", memory_capacity=32,
            latent_dim=16, generator_width=8)


def _method(teacher, batches: int = 1, **flags) -> CPSC:
    return built(CPSC, CPSCConfig(**{**TINY, **flags}), teacher, batches=batches)


def test_replay_memory_keeps_the_asked_labels_and_the_student_learns_from_them(calibrated_teacher, monkeypatch):
    method = _method(calibrated_teacher, batches=0)
    seen: list[torch.Tensor | None] = []
    loss = method.proxy_student_loss
    monkeypatch.setattr(method, "proxy_student_loss", lambda x, y=None: seen.append(y) or loss(x, y))
    batch = next(method.synthesize())
    assert torch.equal(method.memory.all_labels(), batch.labels)
    # Every KD step got labels, and each replayed image's label is the one its stored batch asked for.
    assert len(seen) == method.config.kd_steps and all(y is not None for y in seen)
    rows, labels = method.memory.sample_with_labels(64)
    stored = quantise(batch.images)
    for row, label in zip(rows, labels, strict=True):
        index = next(i for i in range(len(stored)) if torch.equal(stored[i], row))
        assert int(label) == int(batch.labels[index])


def test_student_loss_is_ikd_plus_ce_on_the_asked_labels_plus_scl(calibrated_teacher):
    method = _method(calibrated_teacher, ikd_l2_weight=3.0, class_weight=0.5, kd_temperature=2.0)
    images = dequantise(method.memory.sample(8))
    with torch.no_grad():
        t_logits, t_features = method.teacher.forward_with_features(images)
    method.student.eval()  # BN on running statistics: the same student output in every call below
    s_logits, s_features = method.student.forward_with_features(images)
    asked = (t_logits.argmax(1) + 1) % 10  # labels the teacher does not give: CE must use these
    asked[0] = -1  # stored without a label: the teacher's argmax stands in
    target = torch.where(asked >= 0, asked, t_logits.argmax(1))
    expected = (distillation_loss(s_logits, t_logits, 2.0) + 3.0 * F.mse_loss(s_logits, t_logits)
                + 0.5 * F.cross_entropy(s_logits, target)
                + 0.7 * supervised_contrastive_loss(t_features, s_features, target, 0.07))
    torch.testing.assert_close(method.proxy_student_loss(images, asked), expected)
    # --no-ce drops the student's CE with the generator's
    method.config.ce = False
    torch.testing.assert_close(method.proxy_student_loss(images, asked),
                               expected - 0.5 * F.cross_entropy(s_logits, target))


def test_generator_and_its_adam_persist_across_batches_and_a_resume(calibrated_teacher, monkeypatch):
    method = _method(calibrated_teacher, batches=0)
    stream = method.synthesize()
    next(stream)
    after_first = {k: v.clone() for k, v in method.generator.state_dict().items()}
    optimizer = method.kept_optimizers.optimizers["generator"]
    starts: list[dict[str, torch.Tensor]] = []
    begin = method.begin_batch

    def spy(labels):
        groups = begin(labels)
        starts.append({k: v.clone() for k, v in method.generator.state_dict().items()})
        return groups

    monkeypatch.setattr(method, "begin_batch", spy)
    next(stream)
    # The second batch started from the first one's weights (no reset to initial or random weights) ...
    assert all(torch.equal(after_first[k], starts[0][k]) for k in after_first)
    assert not torch.equal(method.initial_generator_state["project.weight"], starts[0]["project.weight"])
    # ... with the same Adam, whose moments carry on: one step per inversion step of both batches.
    assert method.kept_optimizers.optimizers["generator"] is optimizer
    steps = {int(s["step"]) for s in optimizer.state.values()}
    assert steps == {2 * method.config.inversion_steps}
    state = method.state_dict()
    again = CPSC(calibrated_teacher, CPSCConfig(**TINY), torch.device("cpu"))
    again.load_state_dict(state)
    next(again.synthesize())
    steps = {int(s["step"]) for s in again.kept_optimizers.optimizers["generator"].state.values()}
    assert steps == {3 * method.config.inversion_steps}


@pytest.mark.parametrize("mode", ["initial", "random"])
def test_a_generator_reset_per_batch_gets_a_fresh_adam(calibrated_teacher, mode):
    method = _method(calibrated_teacher, batches=2, reset_generator=mode)
    assert method.kept_optimizers.optimizers == {}


def test_cfe_maps_per_channel_are_one_scale_and_shift_per_class_and_channel():
    generator = ConditionalDCGANGenerator(16, 10, 3, 32, 8, cfe_per_position=False)
    blocks = [m for m in generator.body if hasattr(m, "norm")]
    assert [tuple(b.weight.shape) for b in blocks] == [(10, 16, 1, 1), (10, 16, 1, 1), (10, 8, 1, 1)]
    assert generator(torch.randn(4, 16), torch.tensor([0, 1, 2, 3])).shape == (4, 3, 32, 32)
    assert CPSCConfig(cfe_maps="channel").cfe_maps == "channel"
    with pytest.raises(ValueError, match="cfe_maps"):
        CPSCConfig(cfe_maps="pixel")


def test_every_methods_config_refuses_a_negative_loss_weight():
    checked = 0
    for cls in registry.all_methods().values():
        for field in dataclasses.fields(cls.config_class):
            if field.name.endswith("_weight"):
                with pytest.raises(ValueError, match=f"{field.name}=-1"):
                    cls.config_class(**{field.name: -1.0})
                checked += 1
    assert checked >= 20
    result = CliRunner().invoke(main, ["run", "cpsc", "--out", "x", "--bn-weight", "-1"])
    assert result.exit_code == 2 and "bn_weight=-1" in result.output
