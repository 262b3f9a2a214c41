"""DiffDFKD's wiring, checked where a broken method would still pass the loss-level tests: denoiser forwards
counted per update, the CutMix call inside ``generate()`` spied on, Eq. 3/4 against the scheduler's and
denoiser's own numbers, ``local_files_only`` as passed to diffusers, the label-free prompt and the seeded
Beta draw of Latent CutMix."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / huggingface_hub read it
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_diffusion import save_dit  # noqa: E402

from synth.errors import SynthError  # noqa: E402
from synth.methods.diffdfkd import diffusion  # noqa: E402
from synth.methods.diffdfkd import method as method_module  # noqa: E402
from synth.methods.diffdfkd.cutmix import draw_mixes  # noqa: E402
from synth.methods.diffdfkd.method import DiffDFKD, DiffDFKDConfig  # noqa: E402
from synth.methods.diffdfkd.prompts import PromptBuilder  # noqa: E402

# fp32 weights: these tests recompute the denoiser's outputs by hand (bf16 runs: tests/test_precision.py)
TINY = dict(batch_size=4, num_inference_steps=4, interval=2, proxy_student="resnet8", kd_steps=1,
            memory_capacity=64, precision="fp32")


def _method(teacher, model_dir, **options) -> DiffDFKD:
    torch.manual_seed(0)
    return DiffDFKD(teacher, DiffDFKDConfig(diffusion=str(model_dir), **{**TINY, **options}), torch.device("cpu"))


@pytest.mark.parametrize("guidance, inner", [(True, 2), (False, 1)])
def test_one_denoiser_forward_per_update_over_a_whole_batch(calibrated_teacher, sd_dir, guidance, inner):
    """Classifier-free guidance batches both halves into one forward, and the scheduler step reuses the last
    update's output: T x inner_steps forwards per batch, not one more."""
    method = _method(calibrated_teacher, sd_dir, guidance=guidance, inner_steps=inner)
    calls = []
    handle = method.model.denoiser.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        method.generate(method.next_labels())
    finally:
        handle.remove()
    assert len(calls) == 4 * (inner if guidance else 1)
    assert set(calls) == {8}  # conditional and unconditional halves of 4 latents together


def test_generate_cutmixes_the_latents_and_outputs_it_steps(calibrated_teacher, ddpm_dir, monkeypatch):
    """At every mixing step the scheduler steps the *mixed* latent with the *mixed* model output."""
    method = _method(calibrated_teacher, ddpm_dir)
    mixed, stepped = [], []
    real_apply = method_module.apply_mixes

    def spy_apply(tensor, mixes):
        out = real_apply(tensor, mixes)
        mixed.append(out)
        return out

    real_step = method.model.scheduler.step

    def spy_step(output, t, sample, *args, **kwargs):
        stepped.append((output, sample))
        return real_step(output, t, sample, *args, **kwargs)

    monkeypatch.setattr(method_module, "apply_mixes", spy_apply)
    monkeypatch.setattr(method.model.scheduler, "step", spy_step)
    method.generate(method.next_labels())
    assert method.mix_steps() == [1]
    assert len(mixed) == 2  # the latent and its model output, once
    output, sample = stepped[1]
    assert sample is mixed[0] and output is mixed[1]
    assert all(s is not mixed[0] for _, s in stepped[:1] + stepped[2:])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler_class", ["DDIMScheduler", "DDPMScheduler"])
def test_eq_4_equals_the_schedulers_pred_original_sample(prediction, scheduler_class):
    scheduler = getattr(diffusers, scheduler_class)(num_train_timesteps=100, prediction_type=prediction,
                                                    clip_sample=False)
    scheduler.set_timesteps(10)
    model = diffusion.DiffusionModel("pixel", torch.nn.Identity(), scheduler, torch.float32)
    torch.manual_seed(0)
    for t in scheduler.timesteps:
        z, output = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
        want = scheduler.step(output, t, z).pred_original_sample
        torch.testing.assert_close(model.predict_x0(output, z, t), want, rtol=1e-5, atol=1e-5)


def test_eq_3_is_the_guided_combination_of_two_separate_forwards(calibrated_teacher, sd_dir, tmp_path):
    """Text (SD) and class (DiT) conditions: the one batched forward equals eps(0) + s (eps(c) - eps(0))."""
    dit_dir = save_dit(tmp_path / "dit", {990 + i: f"Class{i}, {i}" for i in range(10)})
    for folder in (sd_dir, dit_dir):
        method = _method(calibrated_teacher, folder)
        labels = method.next_labels()
        condition, _ = method.condition(labels)
        model, s = method.model, 3.0
        model.scheduler.set_timesteps(4)
        t = model.scheduler.timesteps[1]
        z = torch.randn(4, *model.latent_shape)
        z_in = model.scheduler.scale_model_input(z, t)
        with torch.no_grad():
            got = model.model_output(z, t, condition, s)
            if model.kind == "latent-text":
                cond = model.denoiser(z_in, t, encoder_hidden_states=condition["text"]).sample
                uncond = model.denoiser(z_in, t, encoder_hidden_states=condition["negative"]).sample
            else:
                ids = condition["class_labels"]
                cond = model.denoiser(z_in, timestep=t.expand(4), class_labels=ids).sample[:, :4]
                null = torch.full_like(ids, model.null_class)
                uncond = model.denoiser(z_in, timestep=t.expand(4), class_labels=null).sample[:, :4]
        torch.testing.assert_close(got, uncond + s * (cond - uncond), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(cond, uncond)  # the condition matters, so the check has teeth


def test_hub_lookups_and_loads_stay_local_unless_downloading_is_asked(ddpm_dir, monkeypatch):
    """``local_files_only`` as diffusers receives it (HF_HUB_OFFLINE in the tests would hide its absence)."""
    asked = []

    def fake_download(*args, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        raise OSError("not cached")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", fake_download)
    with pytest.raises(diffusion.DiffusionModelError):
        diffusion.resolve("some-org/some-model")
    with pytest.raises(diffusion.DiffusionModelError):
        diffusion.resolve("some-org/some-model", allow_download=True)
    assert asked == [True, False]

    loaded = []
    real = diffusers.DiffusionPipeline.from_pretrained

    def spy_from_pretrained(*args, **kwargs):
        loaded.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", spy_from_pretrained)
    diffusion.load(ddpm_dir, torch.device("cpu"))
    assert loaded == [True]


def test_prompts_are_label_free_by_default_and_name_the_class_on_request():
    assert DiffDFKDConfig().prompt == "a realistic photo"
    torch.manual_seed(0)
    free = PromptBuilder("a realistic photo", None, 3, "close-up", "")  # no class names needed
    assert free([0, 1, 2]) == ["a realistic photo, close-up"] * 3
    named = PromptBuilder("a realistic photo of a {name}", ["cat", "dog", "cow"], 3)
    assert named([2, 0]) == ["a realistic photo of a cow", "a realistic photo of a cat"]
    with pytest.raises(SynthError, match="class names"):
        PromptBuilder("a photo of a {name}", None, 3)
    with pytest.raises(SynthError, match="only use the field"):
        PromptBuilder("a photo of a {label}", ["a", "b", "c"], 3)


def test_cutmix_boxes_follow_the_generator_not_the_global_seed():
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append(draw_mixes(8, 16, 16, beta=1.0, generator=torch.Generator().manual_seed(5)))
    assert draws[0] == draws[1]
    other = draw_mixes(8, 16, 16, beta=1.0, generator=torch.Generator().manual_seed(6))
    assert [m.box for m in other] != [m.box for m in draws[0]]
