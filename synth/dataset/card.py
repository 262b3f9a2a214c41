"""The dataset card: ``README.md`` inside a dataset folder, so a folder handed to another team explains itself.

Written by ``synth run`` at completion, by ``synth inspect`` (with its freshly computed figures) and by
``synth merge``. Everything in it comes from the manifest (and the inspect report), never from the clock, so
the same dataset always gets the same bytes. Its YAML front matter is a Hugging Face dataset card: with it,
``datasets.load_dataset(DIR)`` finds the shards by itself (``load_dataset("webdataset", data_files=...)``
works with or without it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import shards
from atomicio import write_atomic

CARD_NAME = "README.md"
GRID_NAME = "samples.png"


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _method_info(name: str | None) -> tuple[str, str]:
    """(summary, paper) of a registered method; blank for names this install does not know (merged sets)."""
    if not name:
        return "", ""
    from synth.core.registry import all_methods

    cls = all_methods().get(name)
    return (cls.summary, cls.paper) if cls is not None else ("", "")


def _front_matter(manifest: dict[str, Any]) -> list[str]:
    urls = [entry["url"] for entry in manifest["shards"]]
    flat = all("/" not in url for url in urls)
    lines = ["---", "configs:", "- config_name: default", "  data_files:", "  - split: train"]
    if flat:
        lines.append('    path: "shard-*.tar"')
    else:  # merged in place: shards in sub-folders, listed one by one
        lines.append("    path:")
        lines += [f'    - "{url}"' for url in urls]
    lines += ["tags:", "- synthetic", "- data-free-knowledge-distillation", "- webdataset",
              f"pretty_name: {json.dumps(_title(manifest))}", "---", ""]
    return lines


def _title(manifest: dict[str, Any]) -> str:
    method = (manifest.get("method") or {}).get("name") or "unknown method"
    arch = (manifest.get("teacher") or {}).get("arch") or "a teacher"
    return f"Synthetic {manifest.get('num_classes')}-class images by {method} from {arch}"


def _method_section(manifest: dict[str, Any]) -> list[str]:
    method = manifest.get("method") or {}
    lines = ["## Method", ""]
    lineage = manifest.get("lineage") or []
    if lineage:
        lines += [f"Merged by `synth merge` from {len(lineage)} datasets of the same teacher; each keeps its "
                  "method and config:", "", "| source | method | paper | seed | samples | shards |",
                  "|---|---|---|---|---|---|"]
        for i, source in enumerate(lineage):
            block = source.get("method") or {}
            _summary, paper = _method_info(block.get("name"))
            lines.append(f"| {i} `{source.get('location')}` | `{block.get('name')}` | {paper or '-'} | "
                         f"{block.get('seed')} | {source.get('num_samples')} | {len(source.get('shards', []))} |")
        return [*lines, ""]
    summary, paper = _method_info(method.get("name"))
    lines.append(f"**`{method.get('name')}`**" + (f": {summary}." if summary else ""))
    if paper:
        lines += ["", f"Paper: {paper}."]
    fanout = (manifest.get("identity") or {}).get("fanout")
    precision = f", precision `{method['precision']}`" if method.get("precision") else ""  # changes the images
    lines += ["", f"Seed {method.get('seed')}, preset `{method.get('preset')}`{precision}"
              + (f", fan-out part {fanout['rank']} of {fanout['world']}" if fanout else "") + ". Full config:", "",
              "```json", json.dumps(method.get("config"), indent=1, sort_keys=True), "```", ""]
    if method.get("plugins"):
        lines += ["Loss plug-ins:", "", "```json", json.dumps(method["plugins"], indent=1, sort_keys=True), "```", ""]
    return lines


def _teacher_section(manifest: dict[str, Any]) -> list[str]:
    t = manifest.get("teacher") or {}
    rows = [("architecture", f"`{t.get('arch')}`"), ("classes", t.get("num_classes")),
            ("input", f"{t.get('input_size')}×{t.get('input_size')}×{t.get('in_channels')}"),
            ("normalisation mean", t.get("mean")), ("normalisation std", t.get("std")),
            ("weights sha256", f"`{t.get('sha256')}`"), ("test accuracy", _pct(t.get("test_accuracy"))),
            ("trained on", t.get("dataset") or "not recorded")]
    lines = ["## Teacher", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "Images are stored as pixels in [0, 255]; the teacher saw them as `(x / 255 - mean) / std` with the "
             "normalisation above. A student trained from this set should use the same normalisation "
             "(`distill run` does so by itself).", ""]
    return lines


def _contents_section(manifest: dict[str, Any], per_class: Sequence[float | None] | None) -> list[str]:
    summary = manifest.get("summary") or {}
    names = (manifest.get("teacher") or {}).get("class_names") or []
    counts = manifest.get("class_counts") or []
    total_bytes = sum(int(e["bytes"]) for e in manifest["shards"])
    shapes = shards.image_shapes(manifest)
    if len(shapes) > 1:  # a multi-resolution set (K-Gen): each size with its count
        counts_by_size = manifest.get("resolution_counts") or {}
        shape = ", ".join(f"{list(s)} ×{counts_by_size.get(shards.size_key(s[0], s[1]), '?')}" for s in shapes)
        shape = f"shapes {shape}"
    else:
        shape = f"shape {shapes[0] if shapes else None}"
    state = "complete" if manifest.get("complete") else "INCOMPLETE (a run is unfinished: rerun its command)"
    stop = manifest.get("stop")
    if isinstance(stop, dict) and stop.get("reason") == "time_budget":
        state += (f", stopped by its time budget of {_num(stop.get('time_budget_seconds'))} s "
                  f"({stop.get('requested_images')} images were asked for; a larger --time-budget continues it)")
    lines = ["## Contents", "",
             f"{manifest['num_samples']} images of {shape} (H, W, C) in {len(manifest['shards'])} shards, "
             f"{total_bytes} bytes ({_num(summary.get('bytes_per_sample'))} bytes/sample); {state}.", "",
             f"- teacher agreement with the asked label: **{_pct(summary.get('teacher_agreement'))}**",
             f"- mean teacher entropy: {_num(summary.get('mean_entropy'))} nats", "",
             "| class | name | samples | teacher agreement |", "|---|---|---|---|"]
    for c, count in enumerate(counts):
        name = names[c] if c < len(names) else str(c)
        agreement = per_class[c] if per_class is not None and c < len(per_class) else None
        lines.append(f"| {c} | {name} | {count} | {_pct(agreement)} |")
    sources = manifest.get("source_counts") or {}
    if sources:
        lines += ["", "| source | samples |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(sources.items())]]
    return [*lines, ""]


def _diversity_section(diversity: dict[str, Any] | None) -> list[str]:
    lines = ["## Diversity (teacher feature space)", ""]
    if not isinstance(diversity, dict) or not diversity:
        return [*lines, "Not measured: run `synth inspect DIR --teacher TEACHER` to add it.", ""]
    lines += ["| figure | value |", "|---|---|", *[f"| {k} | {_num(v)} |" for k, v in diversity.items()]]
    return [*lines, ""]


def _usage_section(manifest: dict[str, Any], location: str) -> list[str]:
    teacher = manifest.get("teacher") or {}
    eval_data = f" --eval-data {teacher['dataset']}" if teacher.get("dataset") else ""
    commands = manifest.get("commands") or []
    lines = ["## How it was made", ""]
    if commands:
        lines += ["```bash", *commands, "```"]
    else:
        lines.append("The commands were not recorded (a dataset written before dfkd-toolkit recorded them).")
    for source in manifest.get("lineage") or []:
        for command in source.get("commands") or []:
            lines.append(f"- source `{source.get('location')}`: `{command}`")
    lines += ["", "## Distill a student from it", "", "With dfkd-toolkit installed:", "", "```bash",
              f"distill run --shards {location} --student wrn16_1{eval_data}",
              "# served over HTTP(S) or object storage it works the same, read once into a local cache:",
              "# distill run --shards https://HOST/PATH/TO/THIS/FOLDER --cache-dir ~/.cache/dfkd",
              "```", "",
              "## Read it without this toolkit", "",
              "Every shard is a plain WebDataset tar; each sample `KEY` holds `KEY.png` (the image), `KEY.cls` "
              "(the class it was made for), `KEY.logits.npy` (float16 teacher logits on exactly this image) and "
              "`KEY.json` (metadata). Nothing needs pickle. `manifest.json` lists every shard with its size and "
              "sha256.", "", "```python",
              "import json",
              "folder = \"PATH/TO/THIS/FOLDER\"",
              "manifest = json.load(open(f\"{folder}/manifest.json\"))",
              "shard_files = [f\"{folder}/{shard['url']}\" for shard in manifest[\"shards\"]]",
              "",
              "from datasets import load_dataset       # Hugging Face datasets",
              "ds = load_dataset(\"webdataset\", data_files={\"train\": shard_files}, split=\"train\")",
              "ds = load_dataset(folder, split=\"train\")  # the same: this card's header names the shards",
              "",
              "import webdataset as wds                # plain webdataset",
              "for sample in wds.WebDataset(shard_files, shardshuffle=False).decode(\"pil\"):",
              "    image, label, logits = sample[\"png\"], sample[\"cls\"], sample[\"logits.npy\"]",
              "```", ""]
    return lines


def render_card(manifest: dict[str, Any], *, location: str, diversity: dict[str, Any] | None = None,
                per_class_agreement: Sequence[float | None] | None = None, grid: str | None = GRID_NAME) -> str:
    """The card's Markdown. ``diversity`` and ``per_class_agreement`` default to the manifest's summary."""
    summary = manifest.get("summary") or {}
    diversity = diversity if diversity is not None else summary.get("diversity")
    per_class = per_class_agreement if per_class_agreement is not None else summary.get("per_class_agreement")
    lines = [*_front_matter(manifest), f"# {_title(manifest)}", "",
             f"A synthetic dataset made by data-free knowledge distillation (dfkd-toolkit "
             f"{manifest.get('tool_version')}, format `{manifest['format']}` version {manifest['format_version']}): "
             "images inverted from a teacher classifier, each stored with the teacher's logits on exactly that "
             "image, so students can be distilled from it without the teacher's weights or its training data.", "",
             *_method_section(manifest), *_teacher_section(manifest), *_contents_section(manifest, per_class),
             *_diversity_section(diversity)]
    if grid:
        lines += ["## Samples", "", "One row per class, the first images of each in key order:", "",
                  f"![samples]({grid})", ""]
    lines += _usage_section(manifest, location)
    return "\n".join(lines)


def write_card(directory: str | os.PathLike[str], manifest: dict[str, Any], *, location: str | None = None,
               diversity: dict[str, Any] | None = None, per_class_agreement: Sequence[float | None] | None = None,
               arrays: Any = None) -> Path:
    """Writes ``README.md`` (and, given the decoded ``arrays``, the sample grid ``samples.png``) into the local
    dataset ``directory``, each atomically. Returns the card's path."""
    directory = Path(directory)
    grid = None
    if arrays is not None:
        names = (manifest.get("teacher") or {}).get("class_names")
        write_atomic(directory / GRID_NAME, lambda tmp: shards.sample_grid_png(arrays, tmp, class_names=names))
        grid = GRID_NAME
    elif (directory / GRID_NAME).is_file():
        grid = GRID_NAME
    text = render_card(manifest, location=location or str(directory), diversity=diversity,
                       per_class_agreement=per_class_agreement, grid=grid)
    path = directory / CARD_NAME
    write_atomic(path, text)
    return path


def recorded_commands(out: str | os.PathLike[str], command: str | None) -> list[str]:
    """The commands recorded in the dataset at ``out`` (if any) plus ``command``, each once, in order: a
    resumed or extended run adds its own line to those that made the shards before it."""
    commands: list[str] = []
    try:
        previous = json.loads((Path(out) / "manifest.json").read_text(encoding="utf-8")).get("commands")
        commands = [c for c in previous if isinstance(c, str)] if isinstance(previous, list) else []
    except (OSError, ValueError, AttributeError):
        pass  # no dataset yet, or one the writer will refuse with a proper message
    if command and command not in commands:
        commands.append(command)
    return commands


def publish(out: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Card and sample grid for the finished local dataset ``out`` (decodes it once for the grid; a set of
    several image sizes is shown resized to its largest)."""
    sizes = shards.image_shapes(manifest)
    largest = max((max(h, w) for h, w, _ in sizes), default=None) if len(sizes) > 1 else None
    arrays = shards.load_arrays(out, progress=False, resize=largest)
    return write_card(out, manifest, arrays=arrays)
