"""K-Gen: the CAM against a hand computation, target masks, the noisy layer, the radii, the ED hinges, the text
encoder loaded offline from a folder, and runs through ``synth run kgen-s``.

Every expected number is computed here by hand (loops, closed forms), never by the function under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import NoArtifacts, make_teacher
from torch import nn

import shards
import zoo
from synth.commands.cli import main
from synth.errors import SynthError
from synth.methods.kgen.cam import CamError, CamRecorder, key_region_loss, target_mask
from synth.methods.kgen.embedding_diversity import derived_radii, inner_margin_loss, outer_margin_loss
from synth.methods.kgen.method import KGen, KGenConfig, KGenS, KGenSConfig
from synth.methods.kgen.text_embeddings import EMBEDDINGS_FILE

TINY = dict(batch_size=20, inversion_steps=2, kd_steps=2, proxy_student="resnet8", memory_capacity=64,
            latent_dim=16, generator_width=8)


class ToyCNN(nn.Module):
    """conv -> ReLU -> global average pool -> one linear layer: the shape the CAM needs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(a, 1), 1))


class TwoLayerHead(ToyCNN):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))


def test_cam_equals_the_hand_computed_weighted_sum_of_the_last_feature_maps():
    torch.manual_seed(0)
    net = ToyCNN().eval()
    x = torch.rand(2, 3, 5, 5)
    labels = torch.tensor([2, 0])
    recorder = CamRecorder(net)
    with recorder.recording():
        logits = net(x)
    cam = recorder.cam(labels).detach()
    feature_map = torch.relu(net.conv(x)).detach()
    weight = net.fc.weight.detach()
    for n in range(2):
        for h in range(5):
            for w in range(5):
                expected = sum(float(weight[labels[n], k]) * float(feature_map[n, k, h, w]) for k in range(4))
                assert float(cam[n, h, w]) == pytest.approx(expected, abs=1e-5)
        # Zhou et al.: the map's average plus the bias is the class logit.
        bias = float(net.fc.bias.detach()[labels[n]])
        assert float(cam[n].mean()) + bias == pytest.approx(float(logits.detach()[n, labels[n]]), abs=1e-5)


def test_cam_error_names_what_the_cam_needs():
    net = TwoLayerHead().eval()
    recorder = CamRecorder(net, "toy-two-layer-head")
    with pytest.raises(CamError, match="globally average-pooled into one nn.Linear.*toy-two-layer-head"):
        with recorder.recording():
            net(torch.rand(1, 3, 5, 5))
    lenet = zoo.build_model("lenet5", 10, 3).eval()
    recorder = CamRecorder(lenet, "lenet5")
    with pytest.raises(CamError, match="lenet5: no global average pooling"):
        with recorder.recording():
            lenet(torch.rand(1, 3, 32, 32))


def test_cam_ignores_other_networks_run_in_the_same_block():
    torch.manual_seed(0)
    teacher, other = ToyCNN().eval(), zoo.build_model("resnet8", 10, 3).eval()
    recorder = CamRecorder(teacher)
    x = torch.rand(2, 3, 5, 5)
    with recorder.recording():
        teacher(x)
        other(torch.rand(2, 3, 32, 32))  # pools a 64-channel map afterwards: must not replace the teacher's
    assert recorder.feature_map.shape == (2, 4, 5, 5)


def test_target_masks_of_table_20():
    g = target_mask("G(1,2)", 7, 7)
    assert float(g[3, 3]) == pytest.approx(1.0)
    assert float(g[3, 5]) == pytest.approx(math.exp(-4 / 8))  # two cells from the centre, sigma 2
    assert float(g[0, 0]) == pytest.approx(math.exp(-18 / 8))
    g = target_mask("G(2,3)", 4, 4)  # even grid: centre between cells
    assert float(g[1, 1]) == pytest.approx(2 * math.exp(-0.5 / 18))
    assert torch.equal(target_mask("Full(1)", 3, 2), torch.ones(3, 2))
    for bad in ("G(1)", "Full(1,2)", "gauss", "G(1,0)"):
        with pytest.raises(ValueError):
            target_mask(bad, 3, 3)


def test_key_region_loss_is_the_hinge_summed_over_the_grid_and_averaged_over_the_batch():
    cam = torch.tensor([[[0.5, 2.0], [1.0, -1.0]], [[3.0, 3.0], [3.0, 3.0]]])
    target = torch.ones(2, 2)
    # sample 0: 0.5 + 0 + 0 + 2.0 = 2.5; sample 1: 0
    assert float(key_region_loss(cam, target)) == pytest.approx(1.25)


def test_radii_come_out_of_the_representatives():
    reps = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.6, 0.8, 0, 0]])
    # pairwise MSE: (0,1) 2/4 = 0.5, (0,2) (0.16 + 0.64)/4 = 0.2, (1,2) (0.36 + 0.04)/4 = 0.1
    assert derived_radii(reps) == pytest.approx((0.05, 0.1))
    assert derived_radii(reps, inner=0.3) == pytest.approx((0.3, 0.1))
    assert derived_radii(reps, inner=0.3, outer=0.7) == pytest.approx((0.3, 0.7))


def test_method_derives_radii_from_normalised_representatives(calibrated_teacher):
    method = KGenS(calibrated_teacher, KGenSConfig(**TINY, class_embedding="centre"), torch.device("cpu"))
    method.set_representatives(torch.tensor([[2.0, 0], [0, 3.0], [1.0, 1.0]]))
    # normalised: (1,0), (0,1), (s,s) with s = 1/sqrt(2); smallest MSE: ((1-s)^2 + s^2)/2 = 1 - s
    s = 1 / math.sqrt(2)
    assert method.radii == pytest.approx(((1 - s) / 2, 1 - s))


def test_embedding_diversity_hinges():
    targets = torch.zeros(2, 2)
    embedded = torch.tensor([[0.2, 0.0], [0.0, 0.6]])  # per-sample MSE 0.02 and 0.18
    assert float(inner_margin_loss(embedded, targets, 0.05)) == pytest.approx((0 + 0.13) / 2)
    assert float(outer_margin_loss(embedded, targets, 0.05)) == pytest.approx((0.03 + 0) / 2)


def _method(teacher, cls=KGenS, config_cls=KGenSConfig, **flags):
    torch.manual_seed(0)
    method = cls(teacher, config_cls(**{**TINY, "class_embedding": "centre", **flags}), torch.device("cpu"))
    method.prepare(NoArtifacts())
    return method


def test_noisy_layer_is_reinitialised_every_iteration_and_gives_each_sample_its_own_input(calibrated_teacher):
    method = _method(calibrated_teacher)
    labels = method.next_labels()
    method.begin_batch(labels)
    first = method.noisy.weight.detach().clone()
    generator_before = {k: v.clone() for k, v in method.generator.state_dict().items()}
    method.begin_batch(method.next_labels())
    assert not torch.allclose(first, method.noisy.weight)
    assert abs(float(method.noisy.weight.detach().std()) - 1.0) < 0.05  # N(0, 1), NAYER's re-initialisation
    # The generator itself is kept (Alg. 1): begin_batch changed none of its weights.
    assert all(torch.equal(v, method.generator.state_dict()[k]) for k, v in generator_before.items())
    # Samples 0 and 10 ask for the same class; different chunks of the noisy layer map them differently.
    assert int(labels[0]) == int(labels[10])
    z = method.noisy(method.sample_latents(labels))
    assert not torch.allclose(z[0], z[10])


def test_kgen_terms_and_their_groups(calibrated_teacher):
    method = _method(calibrated_teacher)
    stream = method.synthesize()
    next(stream)
    assert sorted(method.losses_of_last_step()) == ["bn", "cls", "kr"]  # no student yet
    next(stream)
    assert sorted(method.losses_of_last_step()) == ["adv", "aed", "bn", "cls", "kr"]
    assert method.representatives.shape == (10, 64)  # centres of the teacher's 64-d features
    ablated = _method(calibrated_teacher, key_region=False, embedding_diversity=False)
    stream = ablated.synthesize()
    next(stream), next(stream)
    assert sorted(ablated.losses_of_last_step()) == ["adv", "bn", "cls"]


def test_multi_resolution_batches_take_turns_with_their_own_sizes(calibrated_teacher):
    method = _method(calibrated_teacher, cls=KGen, config_cls=KGenConfig, resolutions="16,24", batch_sizes="12,8")
    stream = method.synthesize()
    shapes = [tuple(next(stream).images.shape) for _ in range(3)]
    assert shapes == [(12, 3, 16, 16), (8, 3, 24, 24), (12, 3, 16, 16)]
    assert len(method.memories[16]) == 24 and len(method.memories[24]) == 8


def _tiny_bert(folder):
    """A randomly initialised two-layer BERT and a word-level tokenizer, saved like any hub model."""
    transformers = pytest.importorskip("transformers")
    words = ["a", "photo", "of", "class0", "class1", "class2", "class3", "class4", "class5", "class6", "class7",
             "class8", "class9"]
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_text_encoder_loads_from_a_local_folder_offline_and_mean_pools(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from synth.methods.kgen.text_embeddings import encode_texts

    model, tokenizer = _tiny_bert(tmp_path / "bert")
    texts = ["a photo of a class3", "class1"]
    embeddings = encode_texts(texts, str(tmp_path / "bert"))
    assert embeddings.shape == (2, 16)
    for i, text in enumerate(texts):  # each text alone: no padding, the plain mean over its tokens
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        expected = hidden.mean(dim=0)
        assert torch.allclose(embeddings[i], expected / expected.norm(), atol=1e-5)


def test_kgen_caches_text_embeddings_in_the_dataset_and_reuses_them(tmp_path, monkeypatch, calibrated_teacher):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tiny_bert(tmp_path / "bert")
    out = tmp_path / "set"
    teacher_path = tmp_path / "teacher.pt"
    zoo.save_classifier(calibrated_teacher, teacher_path, class_names=[f"class{i}" for i in range(10)])
    args = ["run", "kgen-s", "--out", str(out), "--teacher", str(teacher_path), "--text-encoder",
            str(tmp_path / "bert"), "--batch-size", "10", "--inversion-steps", "1", "--kd-steps", "1",
            "--proxy-student", "resnet8", "--latent-dim", "16", "--generator-width", "8", "--resolutions", "16",
            "--num-images", "20", "--shard-size", "10", "--device", "cpu", "--quiet", "--preset", "paper"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert EMBEDDINGS_FILE in manifest["artifacts"]
    saved = torch.load(out / EMBEDDINGS_FILE, weights_only=True)
    assert saved["prompts"][3] == "a photo of a class3" and saved["embeddings"].shape == (10, 16)
    e = saved["embeddings"].double()
    smallest = min(float(((e[i] - e[j]) ** 2).mean()) for i in range(10) for j in range(10) if i != j)
    assert saved["derived_radii"].tolist() == pytest.approx([smallest / 2, smallest])
    # A second method on the same dataset reads the cache: the encoder folder is no longer needed.
    (tmp_path / "bert" / "config.json").unlink()
    method = KGenS(zoo.load_classifier(teacher_path), KGenSConfig(**TINY, text_encoder=str(tmp_path / "bert")),
                   torch.device("cpu"))
    method.prepare(_FolderArtifacts(out))
    assert torch.equal(method.inputs, saved["embeddings"])
    # A damaged cache, or one that loads but is no embeddings record, is encoded again, not trusted or a traceback.
    _tiny_bert(tmp_path / "bert")
    for damage in (b"not a torch file", ["a", "list"], {**saved, "embeddings": torch.zeros(3, 16)}):
        if isinstance(damage, bytes):
            (out / EMBEDDINGS_FILE).write_bytes(damage)
        else:
            torch.save(damage, out / EMBEDDINGS_FILE)
        saves = []
        method.prepare(_FolderArtifacts(out, saves))
        assert saves == [EMBEDDINGS_FILE] and torch.allclose(method.inputs, saved["embeddings"], atol=1e-6)


class _FolderArtifacts:
    """A dataset folder's artifacts; ``saves`` records what is stored again (None: nothing may be)."""

    def __init__(self, folder, saves=None):
        self.folder = folder
        self.saves = saves

    def path(self, name):
        return self.folder / name

    def save(self, name, write):
        if self.saves is None:
            raise AssertionError("the cached embeddings should have been read, not re-encoded")
        self.saves.append(name)


def test_synth_run_kgen_s_stores_lower_resolution_samples(tmp_path, tiny_teacher):
    out = tmp_path / "set"
    result = CliRunner().invoke(main, [
        "run", "kgen-s", "--out", str(out), "--teacher", str(tiny_teacher), "--class-embedding", "centre",
        "--batch-size", "10", "--inversion-steps", "1", "--kd-steps", "1", "--proxy-student", "resnet8",
        "--latent-dim", "16", "--generator-width", "8", "--num-images", "20", "--shard-size", "10",
        "--device", "cpu", "--quiet", "--preset", "paper"])
    assert result.exit_code == 0, result.output
    manifest = shards.read_manifest(out)
    assert manifest["schema"]["image"]["shape"] == [28, 28, 3] and manifest["resolution_counts"] == {"28x28": 20}
    assert shards.verify(out) == []
    # distill trains at the stored 28x28 and evaluates at the teacher's 32x32
    from distill.cli import main as distill_main

    student = tmp_path / "student"
    result = CliRunner().invoke(distill_main, [
        "run", "--shards", str(out), "--student", "resnet8", "--batch-size", "10", "--epochs", "1",
        "--eval-data", "none", "--out", str(student), "--workers", "0", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["resolutions"] == {"mode": "single", "counts": {"28x28": 20}, "train_size": [28, 28],
                                      "eval_size": [32, 32]}


def test_synth_run_kgen_refuses_a_teacher_without_a_cam(tmp_path):
    teacher = make_teacher(tmp_path / "lenet.pt", arch="lenet5")
    result = CliRunner().invoke(main, [
        "run", "kgen-s", "--out", str(tmp_path / "set"), "--teacher", str(teacher), "--class-embedding", "centre",
        "--batch-size", "10", "--inversion-steps", "1", "--latent-dim", "16", "--generator-width", "8",
        "--bn-weight", "0", "--num-images", "10", "--device", "cpu", "--quiet", "--preset", "paper"])
    assert result.exit_code == 1
    assert "class activation map" in result.output and "nn.Linear" in result.output
    assert not (tmp_path / "set").exists()  # refused before anything was written


def _fitted(config, input_size: int = 32):
    config.fit_to(input_size)  # what a run does with the teacher's input size
    return config


def test_memory_ratio_budget_counts_pixels_of_the_real_resolution():
    # kgen-s at 28 against 60,000 real 32x32 images at 10%: 6,000 images' pixels buy 6,000 * (32/28)^2 = 7,836.7
    assert _fitted(KGenSConfig(memory_ratio=0.1, real_set_size=60_000)).memory_budget_images() == 7836
    # kgen, 130 at 28 + 100 at 32 per turn: 230 images cost (130*784 + 100*1024)/1024 = 199.53 full-size images
    assert _fitted(KGenConfig(memory_ratio=0.1, real_set_size=60_000)).memory_budget_images() == int(
        6000 * 230 / 199.53125)
    assert _fitted(KGenSConfig()).memory_budget_images() is None
    # l defaults to the teacher's input: 112 px against 1,281,167 real 224 px images at 10% (issue 20's case)
    imagenet = _fitted(KGenSConfig(resolutions="112", memory_ratio=0.1, real_set_size=1_281_167), 224)
    assert imagenet.memory_resolution == 224 and imagenet.memory_budget_images() == 512_466
    with pytest.raises(ValueError, match="real-set-size"):
        KGenSConfig(memory_ratio=0.1)


def test_synth_run_takes_its_image_count_from_the_memory_ratio(tmp_path, tiny_teacher):
    out = tmp_path / "set"
    result = CliRunner().invoke(main, [
        "run", "kgen-s", "--out", str(out), "--teacher", str(tiny_teacher), "--class-embedding", "centre",
        "--memory-ratio", "0.001", "--real-set-size", "10000", "--resolutions", "16", "--batch-size", "20",
        "--inversion-steps", "1", "--kd-steps", "1", "--proxy-student", "resnet8", "--latent-dim", "16",
        "--generator-width", "8", "--device", "cpu", "--quiet", "--preset", "paper"])
    assert result.exit_code == 0, result.output
    assert shards.read_manifest(out)["num_samples"] == 40  # 10 images of 32x32 = 40 of 16x16


def test_fewer_patches_vit_is_the_plain_vit_at_full_size_and_draws_centre_biased_windows():
    from zoo.architectures.fewer_patches_vit import FewerPatchesViT, centre_probabilities

    torch.manual_seed(0)
    vit = zoo.build_model("tv:vit_b_16", 10, 3).eval()
    wrapped = FewerPatchesViT(vit)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), vit(x), atol=1e-4)  # full grid: the teacher as it was trained
    probs = centre_probabilities(14, 7)  # 7x7 windows in the 14x14 grid: centres 3..10 only
    assert float(probs[:3].sum()) == 0 and float(probs[11:].sum()) == 0
    # 1 / (1 + d^2): the four central cells (d^2 = 0.5) beat a cell at d^2 = 0.5 + 2 * 3 ... by the closed form
    assert float(probs[6, 6] / probs[3, 3]) == pytest.approx((1 + 2 * 3.5**2) / (1 + 2 * 0.5**2))
    wrapped.random_offsets = True
    origins = wrapped.window_origins(2000, 7, torch.device("cpu"))
    assert origins.min() >= 0 and origins.max() <= 7
    central = ((origins == 3) | (origins == 4)).all(dim=1).float().mean()
    assert float(central) == pytest.approx(float(probs[6:8, 6:8].sum()), abs=0.03)


def test_kgen_runs_a_torchvision_vit_teacher_with_attention_as_the_key_region_map():
    torch.manual_seed(0)
    teacher = zoo.Classifier(zoo.build_model("tv:vit_b_16", 10, 3).eval(), (0.5,) * 3, (0.25,) * 3)
    method = KGenS(teacher, KGenSConfig(**{**TINY, "batch_size": 4}, resolutions="32", class_embedding="centre"),
                   torch.device("cpu"))
    assert method.bn_hook is None  # LayerNorm only: no L_bn
    method.prepare(NoArtifacts())
    batch = next(method.synthesize())
    assert batch.images.shape == (4, 3, 32, 32)
    assert sorted(method.losses_of_last_step()) == ["cls", "kr"]
    assert method.vit.cls_attention.shape == (4, 2, 2)  # 32 px / 16 = 2 x 2 patches
    # The attention map is a distribution over the patches, scaled so that uniform attention is 1 everywhere.
    assert torch.allclose(method.vit.cls_attention.sum(dim=(1, 2)), torch.full((4,), 4.0), atol=1e-4)
    with torch.no_grad():
        assert teacher(batch.images).shape == (4, 10)  # the run's teacher (stored logits) takes the small images
    with pytest.raises(SynthError, match="multiples of its patch size 16"):
        KGenS(teacher, KGenSConfig(**TINY, resolutions="28", class_embedding="centre"), torch.device("cpu"))
