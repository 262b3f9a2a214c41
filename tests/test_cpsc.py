"""CPSC-DFKD: the CFE block, the adapter, each loss flag, and the directions of the two players' updates.

Every test runs the method's own code on a small calibrated teacher and checks numbers: outputs per label,
gradients (with and without a term), discrepancies before and after a real update.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from methodkit import built, first_step

from synth.commands.cli import main
from synth.core.generators import CategoricalFeatureEmbedding, ConditionalDCGANGenerator
from synth.core.losses import kl_divergence, logit_discrepancy_loss, supervised_contrastive_loss
from synth.core.updates import make_optimizers
from synth.methods.cpsc import CPSC, CPSCConfig

TINY = dict(batch_size=8, inversion_steps=1, kd_steps=2, proxy_student="resnet8", memory_capacity=32,
            latent_dim=16, generator_width=8)


def _method(teacher, batches: int = 1, **flags) -> CPSC:
    """A CPSC after ``batches`` stored batches (its proxy student has learnt), same seed every time."""
    return built(CPSC, CPSCConfig(**{**TINY, **flags}), teacher, batches=batches)


def test_cfe_block_output_depends_on_the_label_and_only_on_it():
    torch.manual_seed(0)
    block = CategoricalFeatureEmbedding(4, num_classes=3, size=5)
    x = torch.randn(1, 4, 5, 5).repeat(4, 1, 1, 1)
    labels = torch.tensor([0, 1, 0, 2])
    block.eval()  # running statistics: each row normalised on its own, so equal inputs give equal rows
    assert torch.equal(block(x, labels)[0], block(x, labels)[1])  # identity affine for every class at first
    with torch.no_grad():
        block.weight.normal_(1.0, 0.5)
        block.bias.normal_(0.0, 0.5)
    out = block(x, labels)
    assert torch.equal(out[0], out[2])
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[3])
    # The maps are per channel *and* position: one class's scale differs across positions of one channel.
    assert block.weight.shape == (3, 4, 5, 5)


@pytest.mark.parametrize("cfe_layers, expected", [(None, 3), (1, 1), (0, 0)])
def test_conditional_generator_puts_cfe_in_the_first_n_normalisation_layers(cfe_layers, expected):
    generator = ConditionalDCGANGenerator(16, 10, 3, 32, 8, cfe_layers)
    kinds = [type(m).__name__ for m in generator.body if "Norm" in type(m).__name__
             or isinstance(m, CategoricalFeatureEmbedding)]
    assert kinds == ["CategoricalFeatureEmbedding"] * expected + ["BatchNorm2d"] * (3 - expected)
    z = torch.randn(6, 16)
    images = generator(z, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert images.shape == (6, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_adapter_exists_only_when_the_feature_sizes_differ(calibrated_teacher):
    same = CPSC(calibrated_teacher, CPSCConfig(**TINY), torch.device("cpu"))  # resnet8: 64 and 64
    assert same.adapter is None
    other = CPSC(calibrated_teacher, CPSCConfig(**{**TINY, "proxy_student": "wrn16_2"}), torch.device("cpu"))
    assert other.adapter is not None
    assert other.adapted(torch.randn(5, 128)).shape == (5, 64)
    adapter_params = {id(p) for p in other.adapter.parameters()}
    assert adapter_params <= {id(p) for g in other.student_optimizer.param_groups for p in g["params"]}


def test_full_cpsc_has_every_term_on_the_generator_only(calibrated_teacher):
    method = _method(calibrated_teacher)
    groups, step = first_step(method)
    terms = method.losses(step)
    assert {name: set(t.updates) for name, t in terms.items()} == {
        "ikd": {"generator"}, "scl": {"generator"}, "ce": {"generator"}, "bn": {"generator"}}
    assert set(groups) == {"generator"}  # z is noise, not optimised, by default
    assert not method.latents.requires_grad
    # Values: the generator's -KL (on samples teacher and student both give the asked class) and L_SCL,
    # recomputed literally.
    teacher_class = step.teacher_logits.argmax(1)
    agree = ((teacher_class == step.student_logits.argmax(1)) & (teacher_class == step.labels)).float()
    assert 0 < agree.sum() < len(agree)  # the mask matters in this test
    # The teacher's side is the fixed reference: no gradient of the adversarial term reaches the teacher's logits.
    assert step.teacher_logits.requires_grad
    assert torch.autograd.grad(terms["ikd"].value, step.teacher_logits, retain_graph=True, allow_unused=True) == (None,)
    p_teacher = step.teacher_logits.softmax(1)
    kl = (p_teacher * (p_teacher.log() - step.student_logits.log_softmax(1))).sum(1)
    torch.testing.assert_close(terms["ikd"].value, -(kl * agree).mean())
    contrast = supervised_contrastive_loss(step.teacher_features[0], step.student_features, step.labels, 0.07)
    torch.testing.assert_close(terms["scl"].value, 0.7 * contrast)


@pytest.mark.parametrize("flag", ["ikd", "ce", "scl", "bn"])
def test_each_loss_flag_removes_exactly_its_term_and_its_share_of_the_generator_gradient(calibrated_teacher, flag):
    method = _method(calibrated_teacher)
    _, step = first_step(method)
    params = list(method.generator.parameters())

    def gradient(terms):
        total = sum(t.value for t in terms.values())
        return torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)

    full = method.losses(step)
    setattr(method.config, flag, False)
    ablated = method.losses(step)
    assert set(full) - set(ablated) == {flag} and set(ablated) <= set(full)
    with_term, without = gradient(full), gradient(ablated)
    alone = gradient({flag: full[flag]})
    changed = False
    for g_full, g_off, g_term in zip(with_term, without, alone, strict=True):
        if g_full is None:
            continue
        g_off = torch.zeros_like(g_full) if g_off is None else g_off
        g_term = torch.zeros_like(g_full) if g_term is None else g_term
        scale = float(g_full.abs().max()) + 1e-12  # float32 cancellation in the difference of two sums
        torch.testing.assert_close(g_full - g_off, g_term, rtol=0, atol=1e-4 * scale)
        changed |= not torch.allclose(g_full, g_off)
    assert changed, f"--no-{flag} left the generator's gradient unchanged"


def _discrepancy(method: CPSC, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float(logit_discrepancy_loss(method.teacher(images), method.student(images),
                                            method.config.ikd_l2_weight))


def test_student_step_lowers_the_discrepancy_and_generator_step_raises_it(calibrated_teacher):
    method = _method(calibrated_teacher, proxy_lr=0.02)
    # The proxy student (minimises L_IKD + L_SCL) on the images it replays.
    from synth.core.pixels import dequantise

    replayed = dequantise(method.memory.sample(8))
    method.student.eval()
    before = _discrepancy(method, replayed)
    method.train_proxy_student()
    assert _discrepancy(method, replayed) < before

    # The generator, with its adversarial term only (on every sample), on a fixed batch of (z, y): one update of
    # the method's own optimiser raises the student's KL from the teacher's distribution, the discrepancy the term
    # ascends (through the student's side: the teacher's distribution is its fixed reference, module docstring).
    # The KL through both networks need not rise, and the first Adam step moves every weight by the learning
    # rate, so the step is small; augmentation is off so that the measured images are the ones the term saw.
    cfg = method.config
    cfg.ce = cfg.scl = cfg.bn = cfg.decision_adversarial = False
    cfg.generator_lr = 1e-3
    method.teacher_view = lambda images: images
    labels = method.next_labels()
    groups = method.begin_batch(labels)
    optimizers = make_optimizers(groups)
    method.engine.reset()
    with torch.no_grad():
        reference = method.teacher(method.generate(method.latents, labels))

    def student_kl() -> float:
        with torch.no_grad():
            return float(kl_divergence(reference, method.student(method.generate(method.latents, labels))))

    before = student_kl()
    step = method.forward_step(0, labels, method.generate(method.latents, labels), needs_student=True)
    method.engine.apply(method.losses(step), groups, optimizers)
    assert student_kl() > 1.03 * before  # +8-11% here, over student weights perturbed by up to 3e-2


def test_first_batch_learns_from_ce_and_bn_only_and_the_generator_persists(calibrated_teacher):
    method = _method(calibrated_teacher, batches=0)
    assert not method.wants_adversarial()
    before = [p.detach().clone() for p in method.generator.parameters()]
    stream = method.synthesize()
    next(stream)
    assert set(method.losses_of_last_step()) == {"ce", "bn"}
    moved = [not torch.equal(b, p) for b, p in zip(before, method.generator.parameters(), strict=True)]
    assert all(moved)  # CFE maps included: each class's maps got a gradient
    after_first = [p.detach().clone() for p in method.generator.parameters()]
    next(stream)
    assert set(method.losses_of_last_step()) == {"ikd", "scl", "ce", "bn"}
    # Kept, not reset, between batches: the second batch started from the first's weights and moved on.
    assert any(not torch.equal(a, p) for a, p in zip(after_first, method.generator.parameters(), strict=True))


def test_resume_state_round_trips_the_adapter(calibrated_teacher):
    method = _method(calibrated_teacher, proxy_student="wrn16_2")
    state = method.state_dict()
    torch.manual_seed(5)
    again = CPSC(calibrated_teacher, CPSCConfig(**{**TINY, "proxy_student": "wrn16_2"}), torch.device("cpu"))
    again.load_state_dict(state)
    for a, b in zip(method.adapter.parameters(), again.adapter.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(again.student_optimizer.param_groups) == 2


def test_cpsc_help_shows_every_option_with_the_papers_default():
    help_text = CliRunner().invoke(main, ["run", "cpsc", "--help"]).output
    for option in ("--cfe / --no-cfe", "--cfe-layers", "--ikd / --no-ikd", "--ce / --no-ce", "--scl / --no-scl",
                   "--bn / --no-bn", "--ikd-l2-weight", "[default: 5.0]", "[default: 0.7]", "--scl-temperature"):
        assert option in help_text, option
    bad = CliRunner().invoke(main, ["run", "cpsc", "--out", "x", "--cfe-layers", "7"])
    assert bad.exit_code == 2 and "cfe_layers" in bad.output
