"""``--precision``: every method, the condensed plug-in, K-Gen at several sizes, DiffDFKD and both distill
commands run one short run under bf16 autocast on the CPU (the code path a GPU runs), with finite losses, a
verified dataset and parameters that moved; the resolution of ``auto`` and the two precision fixes (K-Gen's CAM
check, DiffDFKD's dtype keyword) are pinned."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_diffusion import save_ddpm

import shards
import zoo
from distill.cli import main as distill_main
from synth.commands.cli import main as synth_main
from synth.core.registry import get_method
from zoo import device as zdevice

BF16 = ["--device", "cpu", "--quiet", "--preset", "paper", "--precision", "bf16"]
GEN = ["--batch-size", "8", "--inversion-steps", "2", "--kd-steps", "1", "--proxy-student", "resnet8",
       "--latent-dim", "16", "--generator-width", "8", "--memory-capacity", "64"]
METHODS = {
    "gmi": GEN,
    "deepinversion": ["--batch-size", "8", "--iterations", "2"],
    "fast": [*GEN, "--warmup", "1"],
    "cmi": [*GEN, "--bank-size", "32", "--negatives", "16"],
    "d2cip": [*GEN, "--prior-iterations", "2", "--bank-size", "16"],
    "cpsc": GEN,
    "kgen": [*GEN, "--class-embedding", "centre", "--resolutions", "32", "--batch-sizes", "8"],
    "kgen-s": [*GEN, "--class-embedding", "centre", "--resolutions", "32", "--batch-sizes", "8"],
}


def _watch(monkeypatch, name: str) -> list:
    """Records the method instance a run makes, with a copy of its trained modules' parameters at creation."""
    cls, made = get_method(name), []
    original = cls.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        modules = {a: getattr(self, a) for a in ("generator", "student") if isinstance(getattr(self, a, None),
                                                                                       torch.nn.Module)}
        if hasattr(self, "proxy"):
            modules["proxy"] = self.proxy.model
        made.append((self, {a: [p.detach().clone() for p in m.parameters()] for a, m in modules.items()}, modules))

    monkeypatch.setattr(cls, "__init__", spy)
    return made


def _check_run(result, out, made) -> dict:
    assert result.exit_code == 0, result.output
    assert shards.verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["precision"] == "bf16" and manifest["method"]["precision"] == "bf16"
    method, before, modules = made[-1]
    losses = method.losses_of_last_step() if hasattr(method, "losses_of_last_step") else method.last_losses
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    for attr, module in modules.items():  # each trained module moved under bf16 (gradients reached it)
        moved = [not torch.equal(a, b) for a, b in zip(before[attr], module.parameters(), strict=True)]
        assert any(moved), f"{attr} did not move"
    return manifest


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_under_bf16(method, tmp_path, tiny_teacher, monkeypatch):
    made = _watch(monkeypatch, method)
    out = tmp_path / "set"
    result = CliRunner().invoke(synth_main, ["run", method, "--out", str(out), "--teacher", str(tiny_teacher),
                                             "--num-images", "8", "--shard-size", "8", *METHODS[method], *BF16])
    _check_run(result, out, made)
    assert "precision `bf16`" in (out / "README.md").read_text()  # the card says it
    if method == "gmi":  # stored logits: fp32 on the stored pixels, whatever the synthesis ran in
        arrays = shards.load_arrays(out, progress=False)
        teacher = zoo.load_classifier(tiny_teacher).eval()
        with torch.no_grad():
            fp32 = teacher(torch.from_numpy(arrays.images).permute(0, 3, 1, 2).float() / 255)
        np.testing.assert_array_equal(arrays.logits, fp32.numpy().astype(np.float16))


def test_condensed_plugin_runs_on_a_host_under_bf16(tmp_path, tiny_teacher, monkeypatch):
    condensed = tmp_path / "condensed.npz"
    rng = np.random.default_rng(0)
    np.savez(condensed, images=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), labels=np.arange(10))
    made = _watch(monkeypatch, "gmi")
    out = tmp_path / "condensed"
    result = CliRunner().invoke(synth_main, ["run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher),
                                             "--num-images", "8", "--shard-size", "9", *GEN, *BF16,
                                             "--condensed", str(condensed)])
    assert _check_run(result, out, made)["num_samples"] == 18


def test_kgen_at_several_sizes_runs_under_bf16(tmp_path, tiny_teacher, monkeypatch):
    made = _watch(monkeypatch, "kgen")
    out = tmp_path / "multires"
    result = CliRunner().invoke(synth_main, ["run", "kgen", "--out", str(out), "--teacher", str(tiny_teacher),
                                             "--num-images", "8", "--shard-size", "8", *GEN, *BF16,
                                             "--class-embedding", "centre", "--resolutions", "16,24",
                                             "--batch-sizes", "4,4"])
    assert _check_run(result, out, made)["resolution_counts"] == {"16x16": 4, "24x24": 4}


def test_diffdfkd_runs_under_bf16(tmp_path, tiny_teacher, monkeypatch):
    made = _watch(monkeypatch, "diffdfkd")
    out = tmp_path / "diffdfkd"
    model = save_ddpm(tmp_path / "ddpm", sample_size=8)
    result = CliRunner().invoke(synth_main, ["run", "diffdfkd", "--out", str(out), "--teacher", str(tiny_teacher),
                                             "--diffusion", str(model), "--num-images", "4", "--batch-size", "2",
                                             "--num-inference-steps", "2", "--proxy-student", "resnet8",
                                             "--kd-steps", "1", *BF16])
    _check_run(result, out, made)
    assert {p.dtype for p in made[-1][0].model.denoiser.parameters()} == {torch.bfloat16}  # the one switch


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("precision") / "set"
    result = CliRunner().invoke(synth_main, ["run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher),
                                             "--num-images", "16", "--shard-size", "16", *GEN, "--device", "cpu",
                                             "--quiet", "--preset", "paper", "--inversion-steps", "1"])
    assert result.exit_code == 0, result.output
    return out


def _watch_student(monkeypatch) -> list:
    """Records the model distill's loop trains, with a copy of its parameters when the optimiser is made."""
    import distill.train

    made, original = [], distill.train.make_optimizer

    def spy(model, extra, config):
        made.append((model, [p.detach().clone() for p in model.parameters()]))
        return original(model, extra, config)

    monkeypatch.setattr(distill.train, "make_optimizer", spy)
    return made


def _check_distill(result, out, made, seen) -> None:
    assert result.exit_code == 0, result.output
    assert torch.bfloat16 in {t.dtype for t in seen}  # the convolutions ran under bf16 autocast (fp32: shape checks)
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) > 1 and all(math.isfinite(float(row.split(",")[1])) for row in rows[1:])  # the train loss
    model, before = made[-1]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights and SGD's state stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert json.loads((out / "metrics.json").read_text())["precision"] == "bf16"  # the figures say what ran


def test_distill_run_and_train_under_bf16(small_set, tmp_path, tiny_teacher, monkeypatch):
    seen: list[torch.Tensor] = []
    original = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x: seen.append(o := original(self, x)) or o)
    made = _watch_student(monkeypatch)
    out = tmp_path / "student"
    result = CliRunner().invoke(distill_main, [
        "run", "--shards", str(small_set), "--student", "resnet8", "--batch-size", "8", "--epochs", "1",
        "--eval-data", "none", "--out", str(out), "--workers", "0", "--quiet", "--device", "cpu",
        "--precision", "bf16"])
    _check_distill(result, out, made, seen)
    seen.clear()
    out = tmp_path / "trained"
    result = CliRunner().invoke(distill_main, [
        "train", "--data", "fmnist32", "--arch", "resnet8", "--out", str(out), "--epochs", "1", "--batch-size", "16",
        "--max-train-samples", "32", "--max-eval-samples", "16", "--workers", "0", "--quiet", "--device", "cpu",
        "--teacher", str(tiny_teacher), "--precision", "bf16"])
    _check_distill(result, out, made, seen)


def test_precision_resolution_and_the_deprecated_alias(monkeypatch, tmp_path, tiny_teacher):
    cpu = torch.device("cpu")
    # auto: bf16 on a CPU with a fast path (measured inside the fp32 seed spread), fp32 on one without
    assert zoo.Acceleration(cpu, precision="auto").resolved == ("bf16" if zdevice.cpu_has_bf16() else "fp32")
    monkeypatch.setattr(zdevice, "cpu_has_bf16", lambda: False)
    assert zoo.Acceleration(cpu, precision="auto").resolved == "fp32"
    monkeypatch.undo()
    assert zoo.Acceleration(cpu, precision="bf16").autocast_dtype == torch.bfloat16
    assert zoo.Acceleration(cpu, enabled=False, precision="bf16").resolved == "fp32"
    assert not zoo.Acceleration(cpu, precision="bf16").channels_last
    assert zoo.Acceleration(cpu, precision="fp16").grad_scaler().is_enabled()
    assert not zoo.Acceleration(cpu, precision="bf16").grad_scaler().is_enabled()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert zdevice.auto_precision(torch.device("cuda")) == "fp16"  # older CUDA: fp16 with a grad scaler
    with pytest.raises(zoo.ZooError, match="precision"):
        zoo.Acceleration(cpu, precision="fp8")
    out = tmp_path / "old"
    result = CliRunner().invoke(synth_main, ["run", "deepinversion", "--out", str(out), "--teacher", str(tiny_teacher),
                                             "--num-images", "4", "--batch-size", "4", "--iterations", "1",
                                             "--device", "cpu", "--quiet", "--preset", "paper", "--no-accelerate"])
    assert result.exit_code == 0 and "deprecated" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "precision" not in manifest["identity"] and manifest["method"]["precision"] == "fp32"


def test_kgen_cam_check_holds_under_bf16(tiny_teacher):
    from synth.methods.kgen.cam import CamRecorder

    network = zoo.load_classifier(tiny_teacher).network.eval()
    recorder = CamRecorder(network, "resnet8")
    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), recorder.recording():
        network(torch.rand(16, 3, 32, 32) * 4)
    assert recorder.feature_map is not None and recorder.cam(torch.arange(16) % 10).isfinite().all()


def test_diffusion_weights_get_the_dtype_on_diffusers_that_ignore_dtype(tmp_path, monkeypatch):
    """diffusers < 0.40 reads ``torch_dtype`` only and drops ``dtype``: the weights must still be bf16."""
    import diffusers

    from synth.methods.diffdfkd import diffusion

    model = save_ddpm(tmp_path / "ddpm", sample_size=8)
    original = diffusers.DiffusionPipeline.from_pretrained.__func__
    asked: list[str] = []

    def old_from_pretrained(cls, *args, **kwargs):
        asked.extend(k for k in ("dtype", "torch_dtype") if k in kwargs)
        kwargs.pop("dtype", None)  # what 0.30-0.39 do with it (with a log line)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(old_from_pretrained))
    monkeypatch.setattr(diffusers, "__version__", "0.35.2")
    monkeypatch.setattr(diffusion, "pick_dtype", lambda *_: torch.bfloat16)  # as on CUDA: the keyword is the test
    loaded = diffusion.load(diffusion.resolve(str(model)), torch.device("cpu"), precision="bf16")
    assert {p.dtype for p in loaded.denoiser.parameters()} == {torch.bfloat16}
    assert asked == ["torch_dtype"]


def test_fp16_scales_every_synthesis_update_and_skips_an_overflowed_one():
    """fp16 gradients underflow without loss scaling: the update engine scales each backward pass, unscales before
    the step (the step equals the unscaled one) and skips a step whose gradient overflowed."""
    from synth.core.updates import ParamGroup, UpdateEngine, term

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    param = torch.ones(3, requires_grad=True)
    groups = {"p": ParamGroup([param], lr=0.1)}
    optimizers = {"p": torch.optim.SGD([param], lr=0.1)}
    seen = []
    scaled = param * 2.0
    scaled.register_hook(seen.append)  # the gradient the backward pass carried
    UpdateEngine().apply({"loss": term(scaled.sum(), "p")}, groups, optimizers, scaler)
    assert float(seen[0][0]) == 1024.0  # scaled in the backward pass
    assert torch.allclose(param.detach(), torch.full((3,), 1 - 0.1 * 2.0))  # unscaled for the step
    overflow = (param * float("inf")).sum()
    UpdateEngine().apply({"loss": term(overflow, "p")}, groups, optimizers, scaler)
    assert torch.allclose(param.detach(), torch.full((3,), 0.8)) and scaler.get_scale() < 1024.0


@pytest.mark.parametrize("method", ["gmi", "deepinversion", "d2cip"])
def test_fp16_synthesis_runs_with_its_loss_scaler(method, tmp_path, tiny_teacher, monkeypatch):
    made = _watch(monkeypatch, method)
    scaled = []
    original = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale",
                        lambda self, outputs: scaled.append(self.is_enabled()) or original(self, outputs))
    out = tmp_path / "set"
    result = CliRunner().invoke(synth_main, ["run", method, "--out", str(out), "--teacher", str(tiny_teacher),
                                             "--num-images", "8", "--shard-size", "8", *METHODS[method],
                                             *[a if a != "bf16" else "fp16" for a in BF16]])
    assert result.exit_code == 0, result.output
    assert shards.verify(out) == []
    assert json.loads((out / "manifest.json").read_text())["method"]["precision"] == "fp16"
    assert scaled and all(scaled)  # every update went through an enabled scaler
    method_run = made[-1][0]
    losses = method_run.losses_of_last_step() if hasattr(method_run, "losses_of_last_step") else method_run.last_losses
    assert losses and all(math.isfinite(v) for v in losses.values()), losses


def test_a_precision_without_a_fast_path_is_named_before_it_runs_slowly(monkeypatch, tmp_path, tiny_teacher,
                                                                        small_set):
    monkeypatch.setattr(zdevice, "cpu_has_bf16", lambda: False)  # a CPU without avx512_bf16 / amx_bf16
    cpu = torch.device("cpu")
    assert zdevice.slow_precision_note(zoo.Acceleration(cpu, precision="bf16")) is not None
    assert zdevice.slow_precision_note(zoo.Acceleration(cpu, precision="fp32")) is None
    monkeypatch.setattr(zdevice, "cpu_has_bf16", lambda: True)
    assert zdevice.slow_precision_note(zoo.Acceleration(cpu, precision="bf16")) is None
    assert "fp16 autocast on a CPU" in zdevice.slow_precision_note(zoo.Acceleration(cpu, precision="fp16"))
    monkeypatch.setattr(zdevice, "cpu_has_bf16", lambda: False)
    result = CliRunner().invoke(synth_main, ["run", "deepinversion", "--out", str(tmp_path / "set"), "--teacher",
                                             str(tiny_teacher), "--num-images", "4", "--batch-size", "4",
                                             "--iterations", "1", *BF16])
    assert result.exit_code == 0 and "no known fast path" in result.output
    with pytest.warns(UserWarning, match="no known fast path"):
        result = CliRunner().invoke(distill_main, [
            "run", "--shards", str(small_set), "--student", "resnet8", "--batch-size", "8", "--epochs", "1",
            "--eval-data", "none", "--out", str(tmp_path / "student"), "--workers", "0", "--quiet", "--device",
            "cpu", "--precision", "bf16"])
    assert result.exit_code == 0


def test_both_stages_prepare_their_device(monkeypatch, tmp_path, tiny_teacher, small_set):
    # On CUDA: cuDNN picks its kernels once for the job's fixed shapes, and the peak-memory count starts at zero.
    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: reset.append(device))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    zdevice.prepare_device(torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark and not reset
    zdevice.prepare_device(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark and reset == [torch.device("cuda", 0)]
    # ... and synth and distill each call it on the device they run on.
    import distill.jobs
    import synth.runner
    prepared = []
    for module in (synth.runner, distill.jobs):
        monkeypatch.setattr(module, "prepare_device", prepared.append)
    result = CliRunner().invoke(synth_main, ["run", "deepinversion", "--out", str(tmp_path / "set"), "--teacher",
                                             str(tiny_teacher), "--num-images", "4", "--batch-size", "4",
                                             "--iterations", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert prepared == [torch.device("cpu")]
    result = CliRunner().invoke(distill_main, [
        "run", "--shards", str(small_set), "--student", "resnet8", "--batch-size", "8", "--epochs", "1",
        "--eval-data", "none", "--out", str(tmp_path / "student"), "--workers", "0", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert prepared == [torch.device("cpu")] * 2
