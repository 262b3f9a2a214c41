"""D2CIP: the loss terms, the split of Eq. 13/14, the ablation flags, and the prior's life cycle."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import zoo
from synth.cli import main
from synth.d2cip import D2CIP, D2CIPConfig
from synth.priors import ClassConditionalGMM, StandardNormalPrior

TINY = dict(batch_size=8, inversion_steps=1, kd_steps=1, proxy_student="resnet8", prior_iterations=2,
            memory_capacity=32, bank_size=16, latent_dim=16, generator_width=8)


class _NoArtifacts:
    def path(self, name):
        return None

    def save(self, name, write):
        pass


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return zoo.Classifier(zoo.build_model("resnet8", 10, 3), (0.5,) * 3, (0.25,) * 3)


def _losses_after_two_batches(teacher, **flags) -> tuple[D2CIP, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    method = D2CIP(teacher, D2CIPConfig(**TINY, **flags), torch.device("cpu"))
    method.prepare(_NoArtifacts())
    batches = method.synthesize()
    next(batches)
    next(batches)  # second batch: banks and the proxy student are in play
    labels = method.next_labels()
    method.begin_batch(labels)
    step = method.forward_step(labels, method.generator(method.latents), needs_student=True)
    return method, method.inversion_losses(step)


def test_full_d2cip_has_every_term(teacher):
    _, losses = _losses_after_two_batches(teacher)
    assert set(losses) == {"cls", "bn", "adv", "scr", "zcr"}


@pytest.mark.parametrize("flag, removed", [("scr", "scr"), ("zcr", "zcr")])
def test_each_contrastive_ablation_removes_exactly_its_term(teacher, flag, removed):
    _, full = _losses_after_two_batches(teacher)
    _, ablated = _losses_after_two_batches(teacher, **{flag: False})
    assert set(full) - set(ablated) == {removed}


def test_no_cgmm_swaps_the_prior_and_keeps_every_loss_term(teacher):
    method, losses = _losses_after_two_batches(teacher, cgmm=False)
    assert isinstance(method.prior, StandardNormalPrior)
    assert set(losses) == {"cls", "bn", "adv", "scr", "zcr"}
    full, _ = _losses_after_two_batches(teacher)
    assert isinstance(full.prior, ClassConditionalGMM)


def test_latents_and_generator_update_on_different_losses(teacher):
    """Eq. 13: latents and h_z see gMI + zcr; Eq. 14: generator and h_x see gMI + scr."""
    method, losses = _losses_after_two_batches(teacher)
    groups = method.update_losses(losses)
    gmi = losses["cls"] + losses["bn"] + losses["adv"]
    assert torch.allclose(groups["latents"], gmi + losses["zcr"])
    assert torch.allclose(groups["generator"], gmi + losses["scr"])
    # The image head gets no gradient from the latent loss, the latent head none from the generator's.
    image_head_grads = torch.autograd.grad(groups["latents"], list(method.image_head.parameters()),
                                           retain_graph=True, allow_unused=True)
    assert all(g is None for g in image_head_grads)
    latent_head_grads = torch.autograd.grad(groups["generator"], list(method.latent_head.parameters()),
                                            allow_unused=True)
    assert all(g is None for g in latent_head_grads)


def test_decision_adversarial_is_the_default_and_weights_follow_table_12():
    config = D2CIPConfig()
    assert config.decision_adversarial
    assert (config.class_weight, config.bn_weight, config.scr_weight, config.gmi_weight, config.zcr_weight,
            config.contrast_temperature, config.adv_weight, config.num_components) == (1, 1, 0.8, 1, 1, 0.1, 0.5, 5)


def test_memory_banks_stay_bounded(teacher):
    method = D2CIP(teacher, D2CIPConfig(**TINY), torch.device("cpu"))
    method.prepare(_NoArtifacts())
    batches = method.synthesize()
    for _ in range(4):  # 4 batches of 8 into banks of 16
        next(batches)
    assert len(method.latent_bank) == 16 and len(method.image_bank) == 16


def test_select_from_replays_only_the_most_informative_batch(teacher):
    method = D2CIP(teacher, D2CIPConfig(**TINY, select_from=2), torch.device("cpu"))
    method.prepare(_NoArtifacts())
    batches = method.synthesize()
    next(batches)
    assert len(method.memory) == 0  # first of a pair: nothing replayed yet
    next(batches)
    assert len(method.memory) == 8  # one batch of the pair


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
