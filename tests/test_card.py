"""The dataset card (README.md in a dataset folder), and reading the folder without this project's code."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import shards
from synth.commands.cli import main
from synth.core.registry import all_methods

GENERATOR = ["--batch-size", "8", "--inversion-steps", "1", "--kd-steps", "1", "--proxy-student", "resnet8",
             "--latent-dim", "16", "--generator-width", "8", "--memory-capacity", "32"]
# The smallest run of each method: a card must be written and right for every one of them.
TINY = {
    "gmi": GENERATOR,
    "fast": [*GENERATOR, "--warmup", "0"],
    "cmi": [*GENERATOR, "--bank-size", "32", "--negatives", "8"],
    "cpsc": GENERATOR,
    "d2cip": [*GENERATOR, "--prior-iterations", "1", "--bank-size", "32"],
    "deepinversion": ["--batch-size", "8", "--iterations", "1"],
    "kgen": [*GENERATOR, "--class-embedding", "centre", "--resolutions", "16,32", "--batch-sizes", "4,4"],
    "kgen-s": [*GENERATOR, "--class-embedding", "centre", "--resolutions", "16"],
    "diffdfkd": ["--diffusion", "{ddpm}", "--batch-size", "4", "--num-inference-steps", "4", "--proxy-student",
                 "resnet8", "--kd-steps", "1"],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: torch on one thread here


def synth_run(method: str, out: Path, teacher: Path, images: int = 8, ddpm: Path | None = None) -> None:
    options = [str(ddpm) if option == "{ddpm}" else option for option in TINY[method]]
    args = ["run", method, "--out", str(out), "--teacher", str(teacher), "--num-images", str(images),
            "--shard-size", "4", "--device", "cpu", "--quiet", "--preset", "paper", *options]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def gmi_set(tmp_path_factory, tiny_teacher) -> Path:
    out = tmp_path_factory.mktemp("card") / "gmi-set"
    synth_run("gmi", out, tiny_teacher, images=12)
    return out


def table_rows(card: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with ``header``."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_every_registered_method_has_a_tiny_run_here():
    assert set(TINY) == set(all_methods())


@pytest.mark.parametrize("method", sorted(TINY))
def test_synth_run_writes_a_card_that_describes_the_dataset(method, tmp_path, tiny_teacher, request):
    out = tmp_path / method
    synth_run(method, out, tiny_teacher, ddpm=request.getfixturevalue("ddpm_dir") if method == "diffdfkd" else None)
    card = (out / "README.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    mixed = len(shards.image_shapes(manifest)) > 1  # kgen: 16x16 and 32x32 images
    arrays = shards.load_arrays(out, progress=False, resize=32 if mixed else None)
    if mixed:
        assert "8 images of shapes [16, 16, 3] ×4, [32, 32, 3] ×4 (H, W, C)" in card
    cls = all_methods()[method]
    assert f"**`{method}`**: {cls.summary}." in card and f"Paper: {cls.paper}." in card
    # Teacher identity as the checkpoint file and its card say, not as the manifest says.
    assert f"`{hashlib.sha256(tiny_teacher.read_bytes()).hexdigest()}`" in card
    teacher_rows = dict((r[0], r[1]) for r in table_rows(card, "| | |"))
    assert teacher_rows["architecture"] == "`resnet8`"
    assert teacher_rows["normalisation mean"] == "[0.5, 0.5, 0.5]"
    assert teacher_rows["normalisation std"] == "[0.25, 0.25, 0.25]"
    # Per class: the count in the shards and the share of those images the teacher gives that class.
    predicted = arrays.logits.astype(np.float32).argmax(1)
    for c, name, count, agreement in table_rows(card, "| class | name |"):
        c = int(c)
        mask = arrays.labels == c
        assert name == f"class{c}" and int(count) == int(mask.sum())
        assert agreement == (f"{100 * (predicted[mask] == c).mean():.1f}%" if mask.any() else "n/a")
    overall = 100 * float((predicted == arrays.labels).mean())
    assert f"teacher agreement with the asked label: **{overall:.1f}%**" in card
    assert [row for row in table_rows(card, "| source |")] == [["synthetic", "8"]]
    assert f"| pairwise_separability | {manifest['summary']['diversity']['pairwise_separability']:.4g} |" in card
    # The exact command, and how to distill from the folder.
    command = next(line for line in card.splitlines() if line.startswith("synth run"))
    assert command.startswith(f"synth run {method} --out {out} --teacher {tiny_teacher} --num-images 8")
    assert f"distill run --shards {out} --student wrn16_1" in card
    # The grid it shows: one 64-pixel row per class.
    assert "![samples](samples.png)" in card
    with Image.open(out / "samples.png") as grid:
        assert grid.format == "PNG" and grid.height == 10 * 66 + 2
    assert shards.verify(out) == []


def test_card_is_deterministic_and_a_resumed_run_adds_its_command(tmp_path, tiny_teacher, gmi_set):
    out = tmp_path / "again"
    synth_run("gmi", out, tiny_teacher, images=12)
    first = (out / "README.md").read_text()
    assert first == (gmi_set / "README.md").read_text().replace(str(gmi_set), str(out))
    result = CliRunner().invoke(main, ["run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher),
                                       "--num-images", "16", "--shard-size", "4", "--device", "cpu", "--quiet",
                                       "--preset", "paper", *TINY["gmi"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    made = [line for line in card.splitlines() if line.startswith("synth run gmi")]
    assert [("--num-images 12" in m, "--num-images 16" in m) for m in made] == [(True, False), (False, True)]
    assert "16 images of shape [32, 32, 3]" in card


def test_inspect_rewrites_the_card_with_its_own_figures(tmp_path, tiny_teacher, gmi_set):
    result = CliRunner().invoke(main, ["inspect", str(gmi_set), "--teacher", str(tiny_teacher), "--samples", "12",
                                       "--device", "cpu", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    card = (gmi_set / "README.md").read_text()
    assert report["card"] == str(gmi_set / "README.md")
    assert f"| feature_samples | {report['diversity']['feature_samples']} |" in card
    assert report["diversity"]["feature_samples"] == 12


COLLECT = """
import hashlib, sys
import numpy as np
def row(key, label, image, logits):
    pixels = np.asarray(image.convert("RGB"))
    return [key, int(label), hashlib.sha256(pixels.tobytes()).hexdigest(), np.asarray(logits, np.float32).tolist()]
seen = {"hf": sorted(row(r["__key__"], r["cls"], r["png"], r["logits.npy"]) for r in ds),
        "wds": [row(s["__key__"], s["cls"], s["png"], s["logits.npy"])
                for s in wds.WebDataset(shard_files, shardshuffle=False).decode("pil")]}
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("shards", "synth", "distill", "zoo", "atomicio"))
print(json.dumps({"seen": seen, "ours": ours}))
"""


def test_the_cards_own_snippet_reads_the_folder_with_datasets_and_webdataset(gmi_set, tmp_path):
    """Runs the card's Python code as printed (in a fresh interpreter, no code of this project imported)."""
    pytest.importorskip("datasets")
    card = (gmi_set / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0].replace("PATH/TO/THIS/FOLDER", str(gmi_set))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", snippet + COLLECT], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ours"] == []
    arrays = shards.load_arrays(gmi_set, progress=False)
    expected = [[key, int(label), hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest(),
                 logits.astype(np.float32).tolist()]
                for key, label, image, logits in zip(arrays.keys, arrays.labels, arrays.images, arrays.logits,
                                                     strict=True)]
    assert len(expected) == 12
    assert result["seen"]["hf"] == expected and result["seen"]["wds"] == expected


def test_plain_webdataset_reads_the_raw_bytes(gmi_set):
    import webdataset as wds

    manifest = json.loads((gmi_set / "manifest.json").read_text())
    urls = [str(gmi_set / entry["url"]) for entry in manifest["shards"]]
    images, labels = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False):  # raw bytes: decode with PIL and numpy only
        images.append(np.asarray(Image.open(io.BytesIO(sample["png"]))))
        labels.append(int(sample["cls"]))
        assert np.load(io.BytesIO(sample["logits.npy"]), allow_pickle=False).dtype == np.float16
    arrays = shards.load_arrays(gmi_set, progress=False)
    assert np.array_equal(np.stack(images), arrays.images) and labels == arrays.labels.tolist()


def test_agreement_over_the_run_follows_the_order_the_shards_were_made():
    from synth.dataset.inspect import agreement_over_run

    # Listed out of order (as a merge may list them): stretches follow first_index, not the list.
    shards_ = [{"first_index": 64 * i, "num_samples": 64, "agreement_count": count}
               for i, count in enumerate([51, 47, 44, 28, 39, 51])]
    manifest = {"shards": shards_[3:] + shards_[:3]}
    stretches = agreement_over_run(manifest)
    assert [s["first_index"] for s in stretches] == [0, 64, 128, 192, 256, 320]
    assert [round(s["agreement"], 4) for s in stretches] == [round(c / 64, 4) for c in (51, 47, 44, 28, 39, 51)]
    grouped = agreement_over_run(manifest, parts=4)  # 6 shards into 4 stretches: 2, 2, 1, 1
    assert [s["samples"] for s in grouped] == [128, 128, 64, 64]
    assert grouped[0]["agreement"] == pytest.approx((51 + 47) / 128)
    assert agreement_over_run({"shards": []}) == []
