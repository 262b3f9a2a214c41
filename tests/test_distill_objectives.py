"""The papers' student objectives in ``distill run``: which one ``--objective auto`` picks from the manifest's
method, and how distill *calls* each loss (the weight that reaches it, the class embeddings and radius it is
given, the logits it compares). The losses are recorded through the module attributes the objectives call."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import distill.objectives as objectives
import shards
import zoo
from distill.cli import main
from distill.data import Batch
from distill.objective_choice import ObjectiveOptions, build_objective, choose_objective

N, K, EMBED = 64, 10, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: torch on one thread here


def _dataset(out: Path, teacher_path: Path, method: str, config: dict, embeddings: torch.Tensor | None = None) -> Path:
    """N random images labelled by the teacher, with the manifest naming ``method``; K-Gen's embeddings stored
    as synth stores them (``class_embeddings.pt``: embeddings, prompts, encoder, derived radii)."""
    teacher = zoo.load_classifier(teacher_path)
    images = np.random.default_rng(0).integers(0, 256, size=(N, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = teacher(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    header = {"method": {"name": method, "config": config, "seed": 0}, "teacher": teacher.card.to_dict()}
    writer = shards.ShardWriter.open(out, identity={"method": method}, header=header, target_samples=N, shard_size=N)
    if embeddings is not None:
        buf = io.BytesIO()
        torch.save({"embeddings": embeddings, "prompts": [], "encoder": "test",
                    "derived_radii": torch.tensor([0.0123, 0.0246], dtype=torch.float64)}, buf)
        writer.add_file("class_embeddings.pt", buf.getvalue())
    writer.commit_shard([shards.Sample(f"{i:09d}", images[i], int(logits[i].argmax()), logits[i].astype(np.float16),
                                       {}) for i in range(N)])
    writer.finish({})
    return out


@pytest.fixture(scope="module")
def embeddings() -> torch.Tensor:
    return torch.randn(K, EMBED, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sets(tmp_path_factory, tiny_teacher, embeddings) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    kgen = {"ed_weight": 7.0, "inner_radius": 0.0, "embedding_diversity": True, "class_embedding": "text"}
    return {
        "cpsc": _dataset(root / "cpsc", tiny_teacher, "cpsc", {"ikd_l2_weight": 3.5}),
        "kgen": _dataset(root / "kgen", tiny_teacher, "kgen", kgen, embeddings),
        "kgen-centre": _dataset(root / "kgen-centre", tiny_teacher, "kgen", {**kgen, "class_embedding": "centre"}),
        "gmi": _dataset(root / "gmi", tiny_teacher, "gmi", {}),
    }


def _run(dataset: Path, out: Path, *extra: str):
    args = ["run", "--shards", str(dataset), "--student", "resnet8", "--batch-size", "32", "--epochs", "1",
            "--out", str(out), "--workers", "0", "--quiet", "--eval-data", "none", *extra]
    result = CliRunner().invoke(main, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _record(monkeypatch, name: str) -> list[dict]:
    """Wraps ``distill.objectives.<name>``; each call's arguments are appended to the returned list."""
    calls: list[dict] = []
    real = getattr(objectives, name)

    def recording(*args):
        calls.append({"args": [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]})
        return real(*args)

    monkeypatch.setattr(objectives, name, recording)
    return calls


# ------------------------------------------------------------------------------------------ which objective


def test_auto_picks_the_paper_objective_of_the_dataset_method(sets):
    def choice(name, **options):
        manifest = shards.read_manifest(sets[name])
        return choose_objective(ObjectiveOptions(**options), manifest, mixed=False, msarc=False)

    assert (choice("cpsc").kind, choice("cpsc").weights) == ("ikd", {"alpha": 3.5})
    assert (choice("kgen").kind, choice("kgen").weights) == ("kgen-ed", {"ed_weight": 7.0, "inner_radius": None})
    assert choice("gmi").kind == "kd" and choice("cpsc", objective="kd").kind == "kd"
    centre = choice("kgen-centre")  # K-Gen with teacher centres keeps no representatives in the dataset
    assert centre.kind == "kd" and "class_embeddings.pt" in centre.reason
    assert choice("gmi", objective="ikd").weights == {"alpha": 5.0}  # any dataset; the paper's middle alpha
    assert choice("cpsc", ikd_alpha=6.0).weights == {"alpha": 6.0}
    fast = {"method": {"name": "fast", "config": {}}}  # Fast's student learns from the live teacher: said so
    assert "--teacher T" in choose_objective(ObjectiveOptions(), fast, mixed=False, msarc=False).reason
    assert "--teacher" not in choose_objective(ObjectiveOptions(), fast, mixed=False, msarc=False, live=True).reason


def test_cpsc_set_trains_with_ikd_and_its_alpha_reaches_the_loss(sets, tmp_path, monkeypatch):
    calls = _record(monkeypatch, "ikd_loss")
    result = _run(sets["cpsc"], tmp_path / "auto")
    assert result.exit_code == 0, result.output
    assert "objective: ikd (auto: the dataset was made by cpsc" in result.output
    assert calls and all(call["args"][2] == 3.5 for call in calls)  # the dataset's alpha, every step
    stored = shards.load_arrays(sets["cpsc"]).logits.astype(np.float32)
    compared = calls[0]["args"][1]  # the teacher side: stored logits of the batch's images
    assert any(np.allclose(compared[0].numpy(), row, atol=1e-6) for row in stored)
    metrics = _metrics(tmp_path / "auto")["objective"]
    assert metrics == {"name": "ikd-stored-logits", "kind": "ikd", "chosen_by": "auto", "weights": {"alpha": 3.5},
                       "reason": metrics["reason"]} and "L_IKD" in metrics["reason"]

    calls.clear()
    assert _run(sets["cpsc"], tmp_path / "alpha", "--ikd-alpha", "6").exit_code == 0
    assert calls and all(call["args"][2] == 6.0 for call in calls)
    calls.clear()
    assert _run(sets["cpsc"], tmp_path / "kd", "--objective", "kd").exit_code == 0
    assert not calls and _metrics(tmp_path / "kd")["objective"]["name"] == "kd-stored-logits"


def test_kgen_set_trains_with_the_embedding_diversity_of_its_own_embeddings(sets, embeddings, tmp_path, monkeypatch):
    calls = _record(monkeypatch, "inner_margin_loss")
    result = _run(sets["kgen"], tmp_path / "auto")
    assert result.exit_code == 0, result.output
    assert "objective: kgen-ed (auto: the dataset was made by kgen" in result.output
    assert len(calls) == 2  # every step of the epoch (64 images, batches of 32)
    stored = shards.load_arrays(sets["kgen"])
    normalised = F.normalize(embeddings, dim=1)
    for call in calls:
        embedded, targets, radius = call["args"]
        assert radius == 0.0123  # the radius stored with the embeddings
        assert embedded.shape == (32, EMBED) and torch.allclose(embedded.norm(dim=1), torch.ones(32), atol=1e-5)
        # every target is the representative of the class the teacher gives the image (the stored logits' argmax)
        assert all(any(torch.allclose(t, normalised[c]) for c in set(stored.logits.argmax(1).tolist()))
                   for t in targets)
    first_targets = calls[0]["args"][1]
    assert not torch.allclose(first_targets, normalised[:1].expand_as(first_targets))  # not one fixed row
    metrics = _metrics(tmp_path / "auto")
    weights = metrics["objective"]["weights"]
    assert metrics["objective"]["kind"] == "kgen-ed" and weights["ed_weight"] == 7.0
    assert weights["inner_radius"] == 0.0123 and weights["representatives"] == [K, EMBED]
    assert "ed_loss" in (tmp_path / "auto" / "log.csv").read_text()
    # the projection (resnet8's 64 features -> 16) trains with the student and is kept for --resume
    ckpt = torch.load(tmp_path / "auto" / "last.pt", weights_only=True)
    assert ckpt["objective"]["projection"]["weight"].shape == (EMBED, 64)
    assert len(ckpt["optimizer"]["param_groups"]) == 2

    calls.clear()
    assert _run(sets["kgen"], tmp_path / "radius", "--inner-radius", "0.5").exit_code == 0
    assert calls and all(call["args"][2] == 0.5 for call in calls)


def test_the_ed_weight_scales_the_term_and_kd_keeps_the_run_temperature(sets, monkeypatch):
    manifest = shards.read_manifest(sets["kgen"])
    choice = choose_objective(ObjectiveOptions(), manifest, mixed=False, msarc=False)
    torch.manual_seed(0)
    student = zoo.Classifier(zoo.build_model("resnet8", K, 3))
    objective = build_objective(choice, location=str(sets["kgen"]), manifest=manifest, student=student,
                                teacher=None, temperature=3.0, condensed_weights=(1, 1), msarc=(0, None))
    temperatures = []
    monkeypatch.setattr(objectives, "inner_margin_loss", lambda e, t, r: torch.tensor(2.0))
    monkeypatch.setattr(objectives, "kd_loss", lambda s, t, temp: temperatures.append(temp) or torch.tensor(0.5))
    images = torch.rand(4, 3, 32, 32)
    batch = Batch(images, torch.zeros(4, dtype=torch.int64), torch.randn(4, K))
    assert float(objective(student(images), batch)) == pytest.approx(0.5 + 7.0 * 2.0) and temperatures == [3.0]


def test_an_objective_without_what_it_needs_is_refused_naming_it(sets, tmp_path):
    result = _run(sets["kgen-centre"], tmp_path / "o1", "--objective", "kgen-ed")
    assert result.exit_code == 1 and "class_embeddings.pt" in result.output and "--objective kd" in result.output
    result = _run(sets["gmi"], tmp_path / "o2", "--objective", "ikd", "--msarc-weight", "1", "--teacher",
                  str(tmp_path / "missing.pt"))
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_live_teacher_with_augment_labels_the_augmented_view_the_student_sees(sets, tiny_teacher, tmp_path,
                                                                              monkeypatch):
    """Fast's and CMI's regime: the teacher's logits are computed on the same augmented view, on the fly."""
    calls = _record(monkeypatch, "ikd_loss")
    seen: dict[str, list[torch.Tensor]] = {"teacher": []}
    real_call = objectives.TeacherLogits.__call__

    def teacher_view(self, batch):
        seen["teacher"].append(batch.images.clone())
        return real_call(self, batch)

    monkeypatch.setattr(objectives.TeacherLogits, "__call__", teacher_view)
    result = _run(sets["cpsc"], tmp_path / "live", "--teacher", str(tiny_teacher), "--augment", "on",
                  "--precision", "fp32")  # compared below with the teacher's fp32 logits
    assert result.exit_code == 0, result.output
    metrics = _metrics(tmp_path / "live")
    assert metrics["objective"]["name"] == "ikd-live-teacher" and metrics["config"]["augment"] is True
    teacher = zoo.load_classifier(tiny_teacher).eval()
    stored = torch.from_numpy(shards.load_arrays(sets["cpsc"]).images).permute(0, 3, 1, 2).float() / 255
    for view, call in zip(seen["teacher"], calls, strict=True):
        with torch.no_grad():
            assert torch.allclose(call["args"][1], teacher(view).float(), atol=1e-5)  # labelled on the fly
        # crops and flips of the stored images (a zero shift without a flip leaves one as it was: 1 in 162)
        unchanged = sum(any(torch.equal(v, s) for s in stored) for v in view)
        assert unchanged < len(view) / 4
