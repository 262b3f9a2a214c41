"""D2CIP: the real update step (Eq. 13/14), stage 1, the ablations, A.8 and the prior's life cycle.

Every test runs the method's own code on a small random teacher and checks numbers: parameters that moved,
gradients against a literal recomputation, loss values, which batch was kept.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import NoArtifacts
from methodkit import built, first_step

from synth.commands.cli import main
from synth.core.inversion import InversionStep
from synth.core.priors import ClassConditionalGMM, StandardNormalPrior
from synth.core.updates import make_optimizers
from synth.methods.d2cip import D2CIP, D2CIPConfig

TINY = dict(batch_size=8, inversion_steps=1, kd_steps=1, proxy_student="resnet8", prior_iterations=2,
            memory_capacity=32, bank_size=16, latent_dim=16, generator_width=8)


@pytest.fixture(scope="module")
def teacher(calibrated_teacher):
    return calibrated_teacher


def _method(teacher, batches: int = 2, **flags) -> D2CIP:
    """A D2CIP after ``batches`` stored batches (banks filled, proxy student trained), same seed every time."""
    return built(D2CIP, D2CIPConfig(**{**TINY, **flags}), teacher, batches=batches, prepare=True)


def _step(method: D2CIP) -> tuple[dict, InversionStep, dict]:
    """Sets up the next batch and runs one forward step (the student's terms once it has learnt); returns
    (groups, step, terms)."""
    groups, step = first_step(method, needs_student=method.proxy_has_learnt)
    return groups, step, method.losses(step)


def test_full_d2cip_has_every_term_with_its_declared_groups(teacher):
    _, _, terms = _step(_method(teacher))
    assert {name: set(t.updates) for name, t in terms.items()} == {
        "cls": {"generator", "latents"}, "bn": {"generator", "latents"}, "adv": {"generator", "latents"},
        "scr": {"generator", "image_head"}, "zcr": {"latents", "latent_head"}}


@pytest.mark.parametrize("flags, passes", [({}, 2), ({"scr": False}, 1), ({"zcr": False}, 2)])
def test_one_real_update_step_moves_every_parameter_group_in_the_fewest_passes(teacher, flags, passes):
    """Two backward passes only where Eq. 13 and 14 truly differ on a group: L_scr reaches the latents but
    must not update them; without L_scr, L_zcr cannot reach the generator and one pass serves both."""
    method = _method(teacher, **flags)
    groups, _, terms = _step(method)
    before = {name: [p.detach().clone() for p in group.params] for name, group in groups.items()}
    passes_before = method.engine.passes_run
    method.engine.apply(terms, groups, make_optimizers(groups))
    for name, group in groups.items():
        moved = any(not torch.equal(p.detach(), b) for p, b in zip(group.params, before[name], strict=True))
        assert moved, f"{name} did not change"
    assert method.engine.passes_run - passes_before == passes


def test_fused_update_equals_the_literal_eq_13_and_14(teacher, engine_gradients):
    """Latents and h_z get d(L_gMI + L_zcr), generator and h_x get d(L_scr + L_gMI): compared with a
    separate autograd call per group, computed by hand on the same graph."""
    method = _method(teacher)
    groups, _, terms = _step(method)
    gmi = terms["cls"].value + terms["bn"].value + terms["adv"].value
    eq13 = gmi + terms["zcr"].value
    eq14 = terms["scr"].value + gmi
    expected = {}
    for name, loss in (("latents", eq13), ("latent_head", eq13), ("generator", eq14), ("image_head", eq14)):
        expected[name] = torch.autograd.grad(loss, groups[name].params, retain_graph=True, allow_unused=True)
    # What L_scr alone sends to the latents: not zero, so leaving it out of Eq. 13 is a real difference.
    scr_to_latents = torch.autograd.grad(terms["scr"].value, [method.latents], retain_graph=True)[0]
    assert scr_to_latents.abs().sum() > 0

    captured = engine_gradients(method.engine, terms, groups)
    for name, grads in expected.items():
        for got, want in zip(captured[name], grads, strict=True):
            if want is None:
                assert got is None or got.abs().max() == 0, name
            else:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_one_teacher_pass_for_both_views_gives_the_same_losses_and_gradients(teacher):
    """The two views through the teacher as one concatenated batch (BN statistics of the first view only) or
    as two passes: the same terms and the same gradient for every group, within float tolerance."""
    method = _method(teacher)
    results = {}
    for fused in (False, True):
        method.fuse_teacher_views = fused
        torch.manual_seed(3)
        groups, _, terms = _step(method)
        values = {name: t.value.item() for name, t in terms.items()}
        grads = {}
        for name, group in groups.items():
            loss = sum(t.value for t in terms.values() if name in t.updates)
            grads[name] = torch.autograd.grad(loss, group.params, retain_graph=True, allow_unused=True)
        results[fused] = values, grads
    (values_separate, grads_separate), (values_fused, grads_fused) = results[False], results[True]
    assert values_fused.keys() == values_separate.keys()
    for name in values_fused:
        assert values_fused[name] == pytest.approx(values_separate[name], rel=1e-4, abs=1e-6), name
    for name, grads in grads_fused.items():
        for got, want in zip(grads, grads_separate[name], strict=True):
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=name)


def test_latents_get_no_scr_gradient_and_heads_only_their_own_loss(teacher):
    method = _method(teacher)
    groups, _, terms = _step(method)
    without_scr = {k: v for k, v in terms.items() if k != "scr"}
    latent_grad_without = torch.autograd.grad(sum(t.value for t in without_scr.values()), [method.latents],
                                              retain_graph=True)[0]
    method.engine.apply(terms, groups, {name: _KeepGrad(g.params) for name, g in groups.items()})
    torch.testing.assert_close(method.latents.grad, latent_grad_without, rtol=1e-4, atol=1e-7)


class _KeepGrad(torch.optim.Optimizer):
    """An optimiser that changes nothing and keeps .grad, to read what the engine set."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none=True):
        return None


def test_each_batch_starts_from_a_freshly_initialised_generator_not_the_stage_1_one(teacher):
    # "theta_G is re-initialized" (Sec. 3.2): restoring stage 1's generator instead made every batch repeat its
    # few images per class (students 39-53% against 75-76% at the paper preset, docs/results.md).
    method = _method(teacher, batches=0)
    stage1 = {k: v.clone() for k, v in method.generator.state_dict().items()}
    weights = [k for k, v in stage1.items() if k.endswith("weight") and v.dim() > 1]  # conv and linear
    method.begin_batch(method.next_labels())
    first = {k: v.clone() for k, v in method.generator.state_dict().items()}
    method.begin_batch(method.next_labels())
    assert all(not torch.equal(first[k], stage1[k]) for k in weights)
    assert all(not torch.equal(first[k], v) for k, v in method.generator.state_dict().items() if k in weights)
    # --reset-generator initial, the CPU preset's (its 5 steps a batch cannot train a fresh generator: 16.81% at
    # 10 minutes): every batch from the stage-1 generator
    from synth.presets import preset_values

    assert preset_values("cpu", D2CIP)[0]["reset_generator"] == "initial"
    method = _method(teacher, batches=0, reset_generator="initial")
    stage1 = {k: v.clone() for k, v in method.generator.state_dict().items()}
    stream = method.synthesize()
    next(stream)
    assert any(not torch.equal(v, stage1[k]) for k, v in method.generator.state_dict().items())
    method.begin_batch(method.next_labels())
    assert all(torch.equal(v, stage1[k]) for k, v in method.generator.state_dict().items())


@pytest.mark.parametrize("reset", ["auto", "initial"])  # initial: the CPU preset's, meaning stage 1's generator
def test_no_cgmm_skips_stage_1_and_draws_a_fresh_generator_and_standard_normal_latents(teacher, reset):
    method = _method(teacher, batches=0, cgmm=False, prior_iterations=10_000_000,  # stage 1 would never end
                     reset_generator=reset)
    assert isinstance(method.prior, StandardNormalPrior)
    first = {k: v.clone() for k, v in method.generator.state_dict().items()}
    method.begin_batch(method.next_labels())
    second = {k: v.clone() for k, v in method.generator.state_dict().items()}
    method.begin_batch(method.next_labels())
    third = method.generator.state_dict()
    weights = [k for k, v in first.items() if k.endswith("weight") and v.dim() > 1]  # conv and linear
    assert all(not torch.equal(first[k], second[k]) for k in weights)  # fresh random weights every batch
    assert all(not torch.equal(second[k], third[k]) for k in weights)
    z = method.sample_latents(torch.zeros(4000, dtype=torch.long))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    full = _method(teacher, batches=0)
    assert isinstance(full.prior, ClassConditionalGMM)


def test_stage_1_loss_falls(teacher):
    torch.manual_seed(0)
    method = D2CIP(teacher, D2CIPConfig(**{**TINY, "batch_size": 32, "prior_iterations": 0}), torch.device("cpu"))
    labels = torch.arange(10).repeat(4)

    def stage1_loss() -> float:
        torch.manual_seed(123)  # the same latent draws and views for both measurements
        with torch.no_grad():
            images = method.generate(method.prior.sample(labels), labels)
            from synth.core.hooks import recording

            with recording(method.bn_hook):
                logits = method.teacher(images)
            return sum(float(t.value) for t in method.stage1_terms(logits, labels).values())

    before = stage1_loss()
    method.config.prior_iterations = 30
    torch.manual_seed(0)
    method.recover_prior(NoArtifacts())
    after = stage1_loss()
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("flag, group", [("scr", "generator"), ("zcr", "latents")])
def test_each_contrastive_ablation_removes_exactly_its_term_from_its_groups_update(teacher, flag, group):
    """Same state, same random draws, the flag toggled: every other term keeps its value, and the update
    loss of the group the term belonged to (Eq. 14 for L_scr, Eq. 13 for L_zcr) loses exactly that term."""
    method = _method(teacher)

    def terms_with(enabled: bool) -> dict[str, float]:
        setattr(method.config, flag, enabled)
        torch.manual_seed(7)
        _, _, terms = _step(method)
        return {name: t.value.item() for name, t in terms.items() if group in t.updates}

    full, ablated = terms_with(True), terms_with(False)
    assert set(full) - set(ablated) == {flag} and full[flag] > 0
    for name, value in ablated.items():
        assert value == pytest.approx(full[name], rel=1e-5), name
    assert sum(full.values()) - sum(ablated.values()) == pytest.approx(full[flag], rel=1e-4)
    if flag == "scr":
        method.config.scr = False
        assert method.teacher_view_count() == 1  # no second view is computed without L_scr


def test_a8_stores_only_the_candidate_with_the_largest_disagreement(teacher, monkeypatch):
    method = _method(teacher, batches=0, select_from=3)
    candidates = [torch.full((8, 3, 32, 32), v) for v in (0.2, 0.6, 0.4)]
    scores = {0.2: 1.0, 0.6: 3.0, 0.4: 2.0}
    calls = iter(candidates)
    monkeypatch.setattr(method, "invert_batch", lambda labels: next(calls))
    monkeypatch.setattr(method, "informativeness", lambda images: scores[round(float(images[0, 0, 0, 0]), 1)])
    pushed = []
    monkeypatch.setattr(method, "after_inversion", lambda images, labels: pushed.append(float(images[0, 0, 0, 0])))
    batch = next(method.synthesize())
    assert float(batch.images[0, 0, 0, 0]) == pytest.approx(0.6)  # the largest score, not the last or first
    assert len(pushed) == 3  # every candidate joins the contrastive banks
    assert len(method.memory) == 8  # only the kept batch is replayed to the proxy student
    assert int(method.memory.all()[0, 0, 0, 0]) == round(0.6 * 255)


def test_a8_informativeness_is_eq_15_disagreement(teacher):
    method = _method(teacher, batches=1)
    torch.manual_seed(1)
    images = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        t, s = method.teacher(images), method.student(images)
    p = torch.log_softmax(t, 1)
    kl = (p.exp() * (p - torch.log_softmax(s, 1))).sum(1)
    agree = (t.argmax(1) == s.argmax(1)).float()
    assert method.informativeness(images) == pytest.approx(float((kl * agree).mean()), rel=1e-5)


def test_cycles_set_the_image_count():
    assert D2CIP.planned_images(D2CIPConfig(batch_size=256, cycles=5)) == 1280
    assert D2CIP.planned_images(D2CIPConfig()) is None


def test_decision_adversarial_is_the_default_and_weights_follow_table_12():
    config = D2CIPConfig()
    assert config.decision_adversarial
    assert (config.class_weight, config.bn_weight, config.scr_weight, config.gmi_weight, config.zcr_weight,
            config.contrast_temperature, config.adv_weight, config.num_components) == (1, 1, 0.8, 1, 1, 0.1, 0.5, 5)


def test_memory_banks_stay_bounded(teacher):
    method = _method(teacher, batches=4)  # 4 batches of 8 into banks of 16
    assert len(method.latent_bank) == 16 and len(method.image_bank) == 16


def test_prior_is_saved_in_the_dataset_and_reused_with_prior_flag(tmp_path, tiny_teacher):
    common = ["--teacher", str(tiny_teacher), "--num-images", "16", "--shard-size", "8", "--device", "cpu",
              "--quiet", "--preset", "paper", "--batch-size", "8", "--inversion-steps", "1", "--kd-steps", "1",
              "--proxy-student", "resnet8", "--latent-dim", "16", "--generator-width", "8", "--bank-size", "16",
              "--memory-capacity", "32"]
    first = tmp_path / "first"
    result = CliRunner().invoke(main, ["run", "d2cip", "--out", str(first), "--prior-iterations", "3", *common],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((first / "manifest.json").read_text())
    prior_entry = manifest["artifacts"]["prior.pt"]
    prior_path = first / prior_entry["url"]
    saved = torch.load(prior_path, weights_only=True)
    assert saved["prior_config"]["num_components"] == 5

    # Reusing it: stage 1 is skipped (an enormous iteration count would otherwise never finish).
    second = tmp_path / "second"
    result = CliRunner().invoke(main, ["run", "d2cip", "--out", str(second), "--prior", str(prior_path),
                                       "--prior-iterations", "100000000", *common], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    reused = torch.load(second / "prior.pt", weights_only=True)
    assert torch.equal(reused["prior"]["means"], saved["prior"]["means"])

    # A prior that does not fit the run is refused with the reason.
    bad = CliRunner().invoke(main, ["run", "d2cip", "--out", str(tmp_path / "third"), "--prior", str(prior_path),
                                    "--num-components", "3", *common])
    assert bad.exit_code != 0 and "K=5" in bad.output
    # A file that loads but is no prior (a stranger's, or damaged) is refused with the reason, not a traceback.
    forged = tmp_path / "forged.pt"
    torch.save({**saved, "generator": {"fc.weight": torch.zeros(1)}}, forged)
    bad = CliRunner().invoke(main, ["run", "d2cip", "--out", str(tmp_path / "fifth"), "--prior", str(forged), *common])
    assert bad.exit_code == 1 and "is not a D2CIP prior for this run" in bad.output
    torch.save({k: v for k, v in saved.items() if k != "prior_config"}, forged)
    bad = CliRunner().invoke(main, ["run", "d2cip", "--out", str(tmp_path / "sixth"), "--prior", str(forged), *common])
    assert bad.exit_code == 1 and "K=None" in bad.output
    # And a prior is meaningless without the cGMM.
    bad = CliRunner().invoke(main, ["run", "d2cip", "--out", str(tmp_path / "fourth"), "--prior", str(prior_path),
                                    "--no-cgmm", *common])
    assert bad.exit_code != 0 and "--no-cgmm" in bad.output


# -- how D2CIP calls its losses (tests/README.md: the mutations these catch) -------------------------------

def test_stage_1_trains_the_prior_not_only_the_generator(teacher, engine_gradients):
    """Eq. 6 updates both: the prior's parameters move, and each step gives the prior the gradient of both
    terms (the generator alone would lower the loss too, so a falling loss proves nothing about the prior)."""
    from synth.core.hooks import recording
    from synth.core.updates import ParamGroup, UpdateEngine

    torch.manual_seed(0)
    method = D2CIP(teacher, D2CIPConfig(**{**TINY, "prior_iterations": 3}), torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in method.prior.named_parameters()}
    method.recover_prior(NoArtifacts())
    for name, p in method.prior.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"stage 1 left the prior's {name} untouched"

    labels = torch.arange(8)  # one stage-1 step as recover_prior takes it
    images = method.generate(method.prior.sample(labels, relaxed=True), labels)
    with recording(method.bn_hook):
        logits = method.teacher(method.teacher_view(images)).float()
    terms = method.stage1_terms(logits, labels)
    prior = list(method.prior.parameters())
    groups = {"generator": ParamGroup(list(method.generator.parameters()), 1e-3), "prior": ParamGroup(prior, 1e-2)}
    want = torch.autograd.grad(sum(t.value for t in terms.values()), prior, retain_graph=True, allow_unused=True)
    got = engine_gradients(UpdateEngine(), terms, groups)["prior"]
    for g, w in zip(got, want, strict=True):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert {"cls", "bn"} <= set(terms)


def _nce_calls(method, monkeypatch) -> list[dict]:
    import synth.methods.d2cip as d2cip_module

    calls, real = [], d2cip_module.info_nce_loss

    def spy(anchors, positives, negatives=None, temperature=0.1):
        calls.append({"anchors": anchors, "positives": positives, "negatives": negatives})
        return real(anchors, positives, negatives, temperature)

    monkeypatch.setattr(d2cip_module, "info_nce_loss", spy)
    return calls


def test_scr_takes_its_negatives_from_the_image_bank(teacher, monkeypatch):
    method = _method(teacher)
    calls = _nce_calls(method, monkeypatch)
    _, step, _ = _step(method)
    scr = calls[0]  # L_scr first, then L_zcr
    with torch.no_grad():
        torch.testing.assert_close(scr["anchors"], method.image_head(step.teacher_features[0]))
        torch.testing.assert_close(scr["negatives"], method.image_head(method.image_bank.all()))
    assert len(scr["negatives"]) == len(method.image_bank) == 16


def test_zcr_positive_is_the_latent_plus_sigma_noise(teacher, monkeypatch):
    method = _method(teacher, latent_noise=0.1)
    calls = _nce_calls(method, monkeypatch)
    inputs = []
    method.latent_head.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))
    _, step, _ = _step(method)
    z = step.latents.detach()
    assert calls[1]["negatives"] is not None and len(calls[1]["negatives"]) == len(method.latent_bank)
    positives = [x for x in inputs if x.shape == z.shape and not torch.equal(x, z)]
    assert any(torch.equal(x, z) for x in inputs) and len(positives) == 1
    noise = positives[0] - z
    assert 0.08 < float(noise.std()) < 0.12  # sigma = 0.1
