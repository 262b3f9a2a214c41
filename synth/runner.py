"""Runs a synthesis method into a dataset directory: quantise, label with the teacher, shard, checkpoint.

The runner is the only place that turns a method's float images into stored samples. Each batch is
quantised to uint8 first and the teacher's logits are computed **on the quantised pixels**, so the stored
logits are exactly what the teacher says about the stored image. At every shard boundary the method's
state, the random-number generators and the not-yet-stored samples are checkpointed together with the
shard (:meth:`shards.ShardWriter.commit_shard`), so a killed run resumes where the last shard ended and
produces the bytes an uninterrupted run would have. A long set-up before the first batch (D2CIP's stage 1) saves
its progress every ``checkpoint_seconds``, and a killed one continues (:mod:`synth.resume`: saving and restoring).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import shards
import zoo
from timebudget import Clock, Deadline, format_duration, system_clock
from zoo.device import peak_memory_bytes, prepare_device, slow_precision_note

from .core.pixels import quantise
from .core.protocol import LossPlugin, SynthConfig, SynthesisMethod
from .dataset import card as dataset_card
from .dataset.diversity import diversity_report, subsample, teacher_features
from .fanout import FanOut
from .resume import WriterArtifacts, pack, restored, rng_state, set_rng_state, unpack


@dataclass
class RunOptions:
    """Options of ``synth run`` that are not hyperparameters of the method."""

    out: Path
    num_images: int = 50_000
    shard_size: int = 2_000
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    preset: str = "paper"
    accelerate: bool = True  # deprecated: False is precision fp32
    precision: str = "auto"  # zoo.Acceleration: auto | fp32 | bf16 | fp16 (autocast, channels_last on CUDA)
    time_budget: float | None = None  # seconds; stop at the first batch boundary after it (see run())
    diversity_samples: int = 2_000
    command: str | None = None  # the command line, recorded in the manifest and the dataset card
    fanout: FanOut = FanOut()  # this worker's part of a fanned-out run (synth/fanout.py)
    clock: Clock | None = None  # what the time budget reads (tests drive it; None: the machine's clock)
    checkpoint_seconds: float = 300.0  # how often a long set-up (D2CIP's stage 1) saves its progress

    def __post_init__(self) -> None:
        if self.num_images <= 0:
            raise ValueError(f"--num-images must be positive, got {self.num_images}")
        if self.shard_size <= 0:
            raise ValueError(f"--shard-size must be positive, got {self.shard_size}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"--time-budget must be positive, got {self.time_budget}")


@torch.no_grad()
def quantise_and_label(teacher: zoo.Classifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x C images and the teacher's float16 logits computed on exactly those pixels (in
    float32, whatever the synthesis ran in, so the stored logits do not depend on --precision)."""
    pixels = quantise(images)
    with torch.autocast(pixels.device.type, enabled=False):  # fp32 even if called inside an autocast block
        logits = teacher(pixels.float().div(255).contiguous()).float()
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy(), logits.float().cpu().numpy().astype(np.float16)


def plugin_configs(plugins: list[LossPlugin]) -> dict[str, Any]:
    return {plugin.name: {**dataclasses.asdict(plugin.options), **plugin.identity_extras()} for plugin in plugins}


def dataset_identity(method: str, config: SynthConfig, seed: int, teacher: zoo.Classifier, shard_size: int,
                     plugins: list[LossPlugin] = (), precision: str = "fp32") -> dict[str, Any]:
    """What must match for a second run to continue a dataset instead of refusing it. Plug-ins and a
    precision other than fp32 (the resolved one: it changes the images) appear only when used, so runs
    without them keep the identity they always had."""
    identity = {
        "method": method,
        "config": dataclasses.asdict(config),
        "seed": seed,
        "shard_size": shard_size,
        "teacher_sha256": teacher.card.sha256,
        # How the teacher sees pixels and names classes changes the stored logits (and K-Gen's images): a resume
        # with another --mean/--std/--class-names/--input-size is another dataset.
        "teacher": {"mean": list(teacher.card.mean), "std": list(teacher.card.std),
                    "class_names": list(teacher.card.class_names), "input_size": teacher.card.input_size},
    }
    if plugins:
        identity["plugins"] = plugin_configs(list(plugins))
    if precision != "fp32":
        identity["precision"] = precision
    return identity


#: The share of what is left of a time budget that a method's one-off set-up (D2CIP's stage 1) may spend: the
#: rest makes the images.
PREPARE_SHARE = 0.5


def run(method_class: type[SynthesisMethod], config: SynthConfig, teacher: zoo.Classifier,
        options: RunOptions, plugins: list[LossPlugin] | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Synthesises ``options.num_images`` samples into ``options.out`` (resuming if it holds a partial run),
    plus the samples plug-ins add (condensed images), which are stored first.

    With ``options.time_budget`` every second of the run counts, from the checks before the dataset is opened
    to the last shard, and earlier runs of the same dataset count too. The method's one-off work before the
    first batch (D2CIP's stage 1) may spend :data:`PREPARE_SHARE` of what is left and stops at its next safe
    point when that is spent; batches are made until the budget is spent, and the run stops after the batch
    during which it ran out: the samples made so far become a shard (shorter than the others when it stops
    between shard boundaries) with the resume state, so no run ends more than one batch past its budget and a
    later run with a larger budget continues with exactly the samples an uninterrupted run would have made."""
    opened: list[shards.ShardWriter] = []
    try:
        return _synthesise(method_class, config, teacher, options, plugins, log, opened)
    finally:
        # The folder's lock is let go however the run ends: a failed run's traceback can keep the writer alive.
        for writer in opened:
            writer.close()


def _synthesise(method_class: type[SynthesisMethod], config: SynthConfig, teacher: zoo.Classifier,
                options: RunOptions, plugins: list[LossPlugin] | None, log: Callable[[str], None],
                opened: list[shards.ShardWriter]) -> dict[str, Any]:
    clock = options.clock or system_clock
    run_started = clock()  # the budget counts the checks below too
    plugins = list(plugins or [])
    method_class.fit_to_teacher(config, teacher)  # the identity records the values the run uses
    method_class.check(teacher, config)  # bad input is refused before anything is written
    for plugin in plugins:
        plugin.check(teacher)
    options, key_offset, fanout = options.fanout.apply(options, sum(p.extra_samples() for p in plugins))
    target = options.num_images + sum(plugin.extra_samples() for plugin in plugins)
    device = zoo.pick_device(options.device)
    prepare_device(device)
    teacher = teacher.to(device).eval()
    out = Path(options.out)
    acceleration = zoo.Acceleration(device, enabled=options.accelerate, precision=options.precision)
    if note := slow_precision_note(acceleration):
        log(f"Warning: {note}")
    identity = dataset_identity(method_class.name, config, options.seed, teacher, options.shard_size, plugins,
                                acceleration.resolved)
    if fanout:
        identity["fanout"] = fanout
    extras = method_class.identity_extras(config, teacher)  # empty for most methods: their identity is unchanged
    identity.update(extras)
    method_header = {"name": method_class.name, "config": dataclasses.asdict(config), "seed": options.seed,
                     "preset": options.preset, "precision": acceleration.resolved, **extras}
    if plugins:
        method_header["plugins"] = plugin_configs(plugins)
    if fanout:
        method_header["fanout"] = {**fanout, "key_offset": key_offset}
    header = {"method": method_header, "teacher": teacher.card.to_dict()}
    commands = dataset_card.recorded_commands(out, options.command)
    if commands:
        header["commands"] = commands
    writer = shards.ShardWriter.open(out, identity=identity, header=header, target_samples=target,
                                     shard_size=options.shard_size, key_offset=key_offset,
                                     mixed_sizes=method_class.stores_mixed_sizes(config))
    opened.append(writer)
    # The budget counts every run of this dataset: the seconds its committed shards took, then this run's.
    # The first shard's seconds start at run_started too (checks and method set-up included), so the shards'
    # seconds, summed, are never less than what the deadline measured.
    # A set-up (D2CIP's stage 1) that killed runs saved but no shard counts yet counts too.
    set_up_before = writer.prepare_seconds
    deadline = Deadline(options.time_budget, already_spent=shards.spent_seconds(writer.manifest)
                        + (clock() - run_started), clock=clock)
    if writer.num_committed >= target:
        log(f"{out}: already complete with {writer.num_committed} samples; nothing to do")
        return _published(out, writer.finish(writer.manifest.get("summary")
                                             or dataset_summary(out, teacher, device, options)))
    if deadline.expired():
        log(f"{out}: its time budget ({format_duration(deadline.seconds)}) is spent with {writer.num_committed} "
            "samples; give a larger --time-budget to continue")
        return _published(out, writer.finish(writer.manifest.get("summary")
                                             or dataset_summary(out, teacher, device, options),
                                             stop=_budget_stop(deadline, options)))

    torch.manual_seed(options.seed)
    method = method_class(teacher, config, device, plugins=plugins, acceleration=acceleration)
    method.show_progress = options.progress
    if deadline.seconds is not None:  # the share of what was left when the set-up began
        method.prepare_deadline = Deadline(PREPARE_SHARE * ((deadline.remaining() or 0.0) + set_up_before),
                                           already_spent=set_up_before, clock=clock)
    method.prepare(WriterArtifacts(writer, out, clock=clock, checkpoint_seconds=options.checkpoint_seconds,
                                   started=run_started, log=log))
    if method.prepare_report:
        log(f"{out}: {method_class.name} set-up stopped early by the time budget: {method.prepare_report}")
    resume = writer.load_resume_state()
    pending: list[shards.Sample] = []
    if resume is not None:
        def apply() -> list[shards.Sample]:
            method.load_state_dict(resume["method"])
            set_rng_state(resume["rng"])
            return unpack(resume["pending"])

        pending = restored(out, "resume state", apply)
        log(f"{out}: resuming after {writer.num_committed} stored samples")
    elif writer.num_committed:
        log(f"{out}: {writer.num_committed} samples stored but no resume state; continuing with a fresh method state")
    next_index = writer.num_committed + len(pending)
    committed_before = writer.num_committed  # "new" counts what this run added to the manifest

    bar = tqdm(total=target, initial=next_index, unit="img", desc=f"synth {method_class.name}",
               disable=not options.progress, dynamic_ncols=True)
    started = clock()
    shard_started = run_started - set_up_before
    produced = 0
    out_of_time = False
    # Seconds and images per stored size (a multi-resolution method's sizes cost differently): from one batch
    # handed over to the next, shard commits excluded.
    by_size: dict[str, list[float]] = {}
    batch_started = clock()
    for batch in method.synthesize():
        pixels, logits = quantise_and_label(teacher, batch.images)
        labels = batch.labels.cpu().tolist()
        height, width = pixels.shape[1:3]
        if batch.source == "synthetic":  # a plug-in's stored images (condensed) cost no synthesis
            size_record = by_size.setdefault(f"{height}x{width}", [0.0, 0])
            size_record[0] += clock() - batch_started
            size_record[1] += min(len(labels), target - next_index)
        for i in range(len(labels)):
            if next_index >= target:
                break
            meta = {"source": batch.source, "resolution": [int(height), int(width)], **batch.meta,
                    **(batch.sample_meta[i] if batch.sample_meta else {})}
            pending.append(shards.Sample(key=f"{key_offset + next_index:09d}", image=pixels[i], label=int(labels[i]),
                                         logits=logits[i], meta=meta))
            next_index += 1
            produced += 1
        bar.n = next_index
        postfix = {k: f"{v:.3g}" for k, v in method.losses_of_last_step().items()}
        if deadline.seconds is not None:
            postfix["budget left"] = format_duration(deadline.remaining() or 0)
        bar.set_postfix(postfix, refresh=True)
        # Decided on the same instant the seconds of the shards committed now end at, so a budget stop always
        # records at least the budget (the commits' own time counts towards the next shard).
        now, expired = clock(), deadline.expired()
        out_of_time = expired and next_index < target
        while len(pending) >= options.shard_size or (out_of_time and pending):
            head, pending = pending[: options.shard_size], pending[options.shard_size:]
            writer.commit_shard(head, state={"method": method.state_dict(), "rng": rng_state(),
                                             "pending": pack(pending)}, seconds=now - shard_started)
            shard_started = now
        if out_of_time or next_index >= target:
            break
        batch_started = clock()
    if pending and not out_of_time:
        writer.commit_shard(pending, state=None, seconds=clock() - shard_started)
    bar.close()
    elapsed = clock() - started
    summary = dataset_summary(out, teacher, device, options)
    summary["synthesis_seconds_this_run"] = round(elapsed, 2)
    summary["synthesis_images_per_second"] = round(produced / elapsed, 2) if elapsed > 0 else None
    summary["peak_memory_bytes"] = peak_memory_bytes(device)
    if deadline.seconds is not None:  # planned vs used, over every run of this dataset
        summary["time_budget"] = {"budget_seconds": deadline.seconds, "used_seconds": round(deadline.elapsed(), 2)}
    if method.prepare_report:
        summary["prepare"] = method.prepare_report
    if len(by_size) > 1:
        summary["images_per_second_by_resolution"] = {size: round(n / seconds, 2) if seconds > 0 else None
                                                      for size, (seconds, n) in sorted(by_size.items())}
    manifest = writer.finish(summary, stop=_budget_stop(deadline, options) if out_of_time else None)
    stopped = f"; stopped by the time budget ({format_duration(deadline.seconds)})" if out_of_time else ""
    log(f"{out}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"({manifest['num_samples'] - committed_before} new, {summary['synthesis_images_per_second']} images/s)"
        f"{stopped}")
    return _published(out, manifest)


def _published(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    # Written after the manifest's commit point: a card is derived from it, never the other way round.
    dataset_card.publish(out, manifest)
    return manifest


def _budget_stop(deadline: Deadline, options: RunOptions) -> dict[str, Any]:
    return {"reason": "time_budget", "time_budget_seconds": deadline.seconds,
            "synthesis_seconds": round(deadline.elapsed(), 2), "requested_images": options.num_images}


def dataset_summary(out: Path, teacher: zoo.Classifier, device: torch.device, options: RunOptions) -> dict[str, Any]:
    """Figures recorded in the manifest: the teacher's agreement with the asked label per class (does a
    conditional method make the class it is asked for?), and diversity on a fixed subsample of the images."""
    manifest = shards.read_manifest(out)
    # A set of several sizes: the figures are computed on every image at the teacher's input size.
    resize = teacher.input_shape[1] if len(shards.image_shapes(manifest)) > 1 else None
    arrays = shards.load_arrays(out, progress=False, resize=resize)
    per_class = shards.summarize(arrays)["per_class"]
    summary: dict[str, Any] = {"per_class_agreement": [row["teacher_agreement"] for row in per_class]}
    index = subsample(len(arrays.labels), options.diversity_samples, seed=options.seed)
    try:
        features = teacher_features(teacher, arrays.images[index], device)
    except zoo.ZooError as error:  # e.g. a TorchScript teacher exposes no penultimate features
        return {**summary, "diversity": {"unavailable": str(error)}}
    return {**summary, "diversity": diversity_report(features)}
