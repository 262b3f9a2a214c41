"""DiffDFKD on tiny randomly initialised diffusers pipelines that the tests build, save_pretrained and load back
through from_pretrained: guidance gradients, falling teacher loss, exact CutMix boxes, decode points, the
manifest's identity of the model, and the missing-model error without network access."""

from __future__ import annotations

import copy
import json
import os
import socket
import tarfile

import pytest
import torch
from click.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / huggingface_hub read it
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_diffusion import save_ddpm, save_dit, save_stable_diffusion  # noqa: E402

from synth.commands.cli import main  # noqa: E402
from synth.methods.diffdfkd import diffusion  # noqa: E402
from synth.methods.diffdfkd.cutmix import apply_mixes, draw_mixes  # noqa: E402
from synth.methods.diffdfkd.method import DiffDFKD, DiffDFKDConfig  # noqa: E402

TINY = dict(batch_size=4, num_inference_steps=4, interval=2, proxy_student="resnet8", kd_steps=1,
            memory_capacity=64)


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """Label names of the calibrated teacher ('0'..'9'), at ids 990..999, with synonyms as ImageNet has them."""
    return save_dit(tmp_path_factory.mktemp("dit") / "pipeline", {990 + i: f"Class{i}, {i}" for i in range(10)})


@pytest.fixture
def model_dirs(ddpm_dir, sd_dir, dit_dir):
    return {"ddpm": ddpm_dir, "sd": sd_dir, "dit": dit_dir}


def _method(teacher, model_dir, **options) -> DiffDFKD:
    torch.manual_seed(0)
    return DiffDFKD(teacher, DiffDFKDConfig(diffusion=str(model_dir), **{**TINY, **options}), torch.device("cpu"))


@pytest.mark.parametrize("which", ["ddpm", "sd", "dit"])
def test_guidance_gradient_reaches_the_latent(calibrated_teacher, which, model_dirs):
    method = _method(calibrated_teacher, model_dirs[which])
    assert method.model.kind == {"ddpm": "pixel", "sd": "latent-text", "dit": "latent-class"}[which]
    labels = method.next_labels()
    condition, prompts = method.condition(labels)
    method.model.scheduler.set_timesteps(4)
    t = method.model.scheduler.timesteps[1]
    z = torch.randn(4, *method.model.latent_shape, requires_grad=True)
    output = method.model.model_output(z, t, condition, method.config.guidance_scale)
    loss = method.inversion_loss(method.teacher_pixels(output, z, t), labels)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert set(method.losses_of_last_step()) == {"cls", "bn"}  # no L_adv before the proxy student has learnt
    if which == "dit":  # the teacher's class names found among the model's labels (a synonym)
        assert condition["class_labels"].tolist() == [990 + int(n) for n in calibrated_teacher.card.class_names[:4]]
    if which == "sd":  # the paper's label-free prompt (Sec. IV-A), a modifier or two after it
        assert all(p.startswith("a realistic photo") and " of a " not in p for p in prompts) and len(prompts) == 4


@pytest.mark.parametrize("which", ["ddpm", "sd", "dit"])
def test_teacher_loss_falls_over_inner_steps(calibrated_teacher, which, model_dirs):
    method = _method(calibrated_teacher, model_dirs[which], inner_steps=6, latent_lr=0.02)
    labels = method.next_labels()
    condition, _ = method.condition(labels)
    method.model.scheduler.set_timesteps(4)
    t = method.model.scheduler.timesteps[1]
    z0 = torch.randn(4, *method.model.latent_shape)
    z, _ = method.guide(z0, t, condition, labels)
    trace = method.loss_trace
    assert len(trace) == 6  # one denoiser forward (and one loss) per update
    assert all(b < a for a, b in zip(trace, trace[1:], strict=False)) and trace[-1] < trace[0] * 0.97, trace
    assert not torch.equal(z, z0)
    off = _method(calibrated_teacher, model_dirs[which], guidance=False)
    z_off, _ = off.guide(z0, t, *off.condition(labels)[:1], labels)
    assert torch.equal(z_off, z0) and off.bn_hook is None


def test_cutmix_exchanges_exactly_the_box():
    torch.manual_seed(3)
    latents = torch.arange(5 * 2 * 8 * 8, dtype=torch.float32).view(5, 2, 8, 8)  # every entry distinct
    mixes = draw_mixes(5, 8, 8, beta=1.0)
    assert len(mixes) == 2
    pairs = [i for m in mixes for i in (m.a, m.b)]
    assert len(set(pairs)) == 4  # disjoint pairs; the odd one out is untouched
    mixed = apply_mixes(latents, mixes)
    expected = latents.clone()
    inside = torch.zeros(5, 8, 8, dtype=torch.bool)
    for m in mixes:
        assert 0 <= m.top <= m.bottom <= 8 and 0 <= m.left <= m.right <= 8
        for y in range(m.top, m.bottom):
            for x in range(m.left, m.right):
                expected[m.a, :, y, x], expected[m.b, :, y, x] = latents[m.b, :, y, x], latents[m.a, :, y, x]
                inside[m.a, y, x] = inside[m.b, y, x] = True
    assert torch.equal(mixed, expected)
    assert torch.equal(mixed.permute(0, 2, 3, 1)[~inside], latents.permute(0, 2, 3, 1)[~inside])
    assert inside.any()  # this seed draws non-empty boxes


@pytest.mark.parametrize("steps, interval, points", [(4, 2, [1, 3]), (5, 2, [0, 2, 4]), (6, 3, [2, 5])])
def test_stored_images_per_latent_equal_the_decode_points(calibrated_teacher, ddpm_dir, steps, interval, points):
    method = _method(calibrated_teacher, ddpm_dir, num_inference_steps=steps, interval=interval)
    assert method.decode_steps() == points
    batch = next(method.synthesize())
    assert batch.images.shape == (4 * len(points), 3, 32, 32)
    assert batch.labels.tolist() == method.next_labels().new_tensor([0, 1, 2, 3]).repeat(len(points)).tolist()
    per_latent = {}
    for meta in batch.sample_meta:
        per_latent.setdefault(meta["latent"], []).append(meta["step"])
    assert per_latent == {j: points for j in range(4)}
    # every mix a latent went through is recorded, symmetrically, only at mixing steps before the sample's step
    last = [m for m in batch.sample_meta if m["step"] == points[-1]]
    for meta in last:
        for mix in meta["mixes"]:
            assert mix["step"] in points[:-1]
            partner = next(m for m in last if m["latent"] == mix["partner"])
            assert {"step": mix["step"], "partner": meta["latent"], "box": mix["box"]} in partner["mixes"]
    assert sum(len(m["mixes"]) for m in last) == 2 * 2 * (len(points) - 1)  # 2 pairs per mixing step


def test_missing_model_is_a_clear_error_without_network(monkeypatch, tmp_path, tiny_teacher):
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: attempts.append(a) or (_ for _ in ()).throw(
        OSError("network disabled in this test")))
    with pytest.raises(diffusion.DiffusionModelError, match="not present locally") as info:
        diffusion.identity("some-org/not-a-cached-model", "main")
    assert "save_pretrained" in str(info.value) and "--allow-download" in str(info.value)
    out = tmp_path / "ds"
    result = CliRunner().invoke(main, ["run", "diffdfkd", "--out", str(out), "--teacher", str(tiny_teacher),
                                       "--diffusion", str(tmp_path / "nowhere"), "--quiet"])
    assert result.exit_code == 1 and "not present locally" in result.output
    assert not out.exists()
    assert attempts == []


def test_run_writes_shards_with_model_identity_and_sample_metadata(tmp_path, tiny_teacher, sd_dir):
    out = tmp_path / "ds"
    args = ["run", "diffdfkd", "--out", str(out), "--teacher", str(tiny_teacher), "--diffusion", str(sd_dir),
            "--num-images", "12", "--shard-size", "8", "--batch-size", "3", "--num-inference-steps", "4",
            "--proxy-student", "resnet8", "--kd-steps", "1", "--quiet", "--preset", "paper"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    model = manifest["method"]["diffusion"]
    assert model["model"] == str(sd_dir) and model["pipeline"] == "StableDiffusionPipeline"
    assert model["sha256"] == diffusion.pipeline_sha256(sd_dir) and len(model["sha256"]) == 64
    assert manifest["method"]["config"]["prompt"] == "a realistic photo"
    metas = []  # the per-sample JSON, straight from the tars
    for entry in manifest["shards"]:
        with tarfile.open(out / entry["url"]) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 12
    assert {m["step"] for m in metas} == {1, 3} and all(m["prompt"].startswith("a realistic photo")
                                                         and "class" not in m["prompt"] for m in metas)
    # Another model with the same path and options is another dataset: resuming into it refuses.
    save_stable_diffusion(sd_dir, seed=1)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "diffusion" in again.output


def test_a_pipeline_folder_holding_code_is_refused_before_any_of_it_runs(tmp_path, tiny_teacher, ddpm_dir):
    """A stranger's pipeline folder whose model_index names its own module (``from_pretrained`` would import it)."""
    import shutil

    marker = tmp_path / "ran"
    for case, edit in (("pipeline", lambda index: index.update(_class_name=["evil", "EvilPipeline"])),
                       ("component", lambda index: index.update(unet=["evil", "EvilUNet"]))):
        folder = tmp_path / case
        shutil.copytree(ddpm_dir, folder)
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        index = json.loads((folder / "model_index.json").read_text())
        edit(index)
        (folder / "model_index.json").write_text(json.dumps(index))
        result = CliRunner().invoke(main, ["run", "diffdfkd", "--out", str(tmp_path / f"out-{case}"), "--teacher",
                                           str(tiny_teacher), "--diffusion", str(folder), "--num-images", "2",
                                           "--device", "cpu", "--quiet"])
        assert result.exit_code == 1 and "holds code that loading it would run" in result.output, result.output
        assert "evil.py" in result.output and not marker.exists()
        assert not (tmp_path / f"out-{case}").exists()


def test_class_conditional_ddpm_needs_class_ids_before_anything_is_written(tmp_path, tiny_teacher):
    model = save_ddpm(tmp_path / "cond", class_embeds=5)
    out = tmp_path / "ds"
    args = ["run", "diffdfkd", "--out", str(out), "--teacher", str(tiny_teacher), "--diffusion", str(model),
            "--num-images", "4", "--batch-size", "2", "--num-inference-steps", "2", "--proxy-student", "resnet8",
            "--quiet", "--preset", "paper"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "--class-ids" in result.output and not out.exists()
    result = CliRunner().invoke(main, [*args, "--class-ids", "0,1,2,3,4,0,1,2,3,4"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["diffusion"]["class_conditional"] is True and manifest["num_samples"] == 4


def test_demonstration_ddpm_trains_and_loads_through_from_pretrained(tmp_path):
    from PIL import Image

    from pipelines import train_ddpm

    for name in ("a", "b"):  # a real image set in the imagefolder layout (labels are ignored)
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((torch.rand(12, 12, 3) * 255).byte().numpy()).save(tmp_path / "images" / name / f"{i}.png")
    out = tmp_path / "ddpm"
    train_ddpm.main(["--images", f"imagefolder:{tmp_path / 'images'}", "--out", str(out), "--size", "8",
                     "--width", "8", "--steps", "3", "--batch-size", "4", "--no-grid"])
    record = json.loads((out / "training.json").read_text())
    assert record["num_images"] == 6 and record["shape"] == [3, 8, 8] and len(record["loss_by_window"]) == 1
    assert not (tmp_path / "ddpm.tmp").exists()
    model = diffusion.load(diffusion.resolve(str(out)), torch.device("cpu"))
    assert model.kind == "pixel" and model.latent_shape == (3, 8, 8) and not model.class_conditional
    assert model.scheduler.config.beta_schedule == "squaredcos_cap_v2"


def test_dit_class_names_must_be_found_or_given(tmp_path, tiny_teacher):
    model = save_dit(tmp_path / "dit", {0: "tench, Tinca tinca", 1: "goldfish"})
    args = ["run", "diffdfkd", "--out", str(tmp_path / "ds"), "--teacher", str(tiny_teacher), "--diffusion",
            str(model), "--num-images", "4", "--batch-size", "2", "--num-inference-steps", "2",
            "--proxy-student", "resnet8", "--quiet", "--preset", "paper"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "no class named 'class0'" in result.output and "--class-ids" in result.output
    result = CliRunner().invoke(main, [*args, "--class-ids", "0,1,0,1,0,1,0,1,0,1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["method"]["diffusion"]["kind"] == "latent-class"
    assert manifest["method"]["diffusion"]["class_ids"] == [0, 1] * 5


def test_resume_state_reproduces_the_next_batch_and_the_proxy_student_joins(calibrated_teacher, ddpm_dir):
    method = _method(calibrated_teacher, ddpm_dir)
    stream = method.synthesize()
    next(stream)
    state, rng = copy.deepcopy(method.state_dict()), torch.get_rng_state()  # as the runner saves it, at once
    second = next(stream)
    assert "adv" in method.losses_of_last_step()  # the proxy student learnt from the first batch
    resumed = _method(calibrated_teacher, ddpm_dir)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    again = next(resumed.synthesize())
    assert torch.equal(again.images, second.images) and again.sample_meta == second.sample_meta
    assert again.sample_meta[0]["latent"] == 4  # latent ids continue across batches
