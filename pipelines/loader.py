"""Does the loader starve the trainer? WRN-16-1 training images/s from shards against a tensor in memory.

    python -m pipelines.loader [--images 4096] [--epochs 2] [--workers 1,2] [--out pipelines/results/loader.json]

Writes a shard dataset of real FMNIST-32 training images (one-hot "teacher" logits: the content does not
change the speed) and trains a WRN-16-1 student with ``distill``'s own loop (:func:`distill.train.fit`, KD from
stored logits, batch 128, no evaluation) from:

- ``tensor``: a uint8 tensor already in memory (:class:`distill.data.TensorSource`): the bound;
- ``memory``: ``distill run --cache memory``: the shards decoded by :func:`shards.load_arrays` with N workers,
  then the same tensor source (the decode is paid once; the figure counts it against the training time);
- ``stream``: ``distill run --cache stream``: WebDataset streaming, verified, decoded in N ``DataLoader``
  workers while the trainer runs.

For each it prints training images/s and the ratio to ``tensor``; for the streaming path also how fast the
stream decodes with the trainer idle (its ceiling), so a shortfall can be traced to decode throughput or to
the decoders and the trainer sharing the machine's cores. Figures go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import realdata
import shards
import zoo
from distill.data import TensorSource
from distill.sources import shard_source
from distill.train import LoopConfig, StoredLogitsKD, fit

BATCH = 128


def write_dataset(out: Path, images: int) -> Path:
    ds = realdata.load("fmnist32", split="train").subset(images, seed=0)
    pixels = ds.uint8_nhwc().numpy()
    logits = np.zeros((len(ds), 10), np.float16)
    logits[np.arange(len(ds)), ds.labels] = 4
    mean, std = realdata.NORMALIZATION["fmnist32"]
    writer = shards.ShardWriter.open(out, identity={"method": "loader-benchmark"}, header={"teacher": {
        "mean": list(mean), "std": list(std)}}, target_samples=len(ds), shard_size=512)
    for start in range(0, len(ds), 512):
        writer.commit_shard([shards.Sample(f"{i:09d}", pixels[i], int(ds.labels[i]), logits[i])
                             for i in range(start, min(len(ds), start + 512))])
    writer.finish({})
    return out


def train(source: Any, epochs: int, work: Path) -> tuple[float, float]:
    """(training images/s, training seconds) of a fresh WRN-16-1 over ``epochs`` epochs of ``source``."""
    torch.manual_seed(0)
    student = zoo.Classifier(zoo.build_model("wrn16_1", 10, 3), (0.5,) * 3, (0.5,) * 3)
    result = fit(student, source, StoredLogitsKD(4.0), LoopConfig(epochs=epochs, batch_size=BATCH),
                 device=torch.device("cpu"), out_dir=work, run_config={"job": "loader"}, progress=False)
    return float(result.images_per_second or 0.0), result.train_seconds


def stream_ceiling(location: Path, workers: int, seconds: float = 10.0) -> float:
    """Samples/s the streaming source delivers with no training (its decode throughput)."""
    source, _ = shard_source(str(location), shards.read_manifest(location), cache="stream", workers=workers,
                             batch_size=BATCH, seed=0, device=torch.device("cpu"), augment=False, with_logits=True,
                             progress=False)
    count, started = 0, time.perf_counter()
    for epoch in range(1000):
        for batch in source.epoch(epoch):
            count += len(batch)
        if time.perf_counter() - started > seconds:
            break
    return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", type=Path, default=Path("pipelines/results/loader.json"))
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    results: dict[str, Any] = {"images": args.images, "epochs": args.epochs, "batch_size": BATCH,
                               "student": "wrn16_1", "cpu_count": os.cpu_count(),
                               "torch_threads": torch.get_num_threads(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        location = write_dataset(Path(tmp) / "set", args.images)
        arrays = shards.load_arrays(location, progress=False)
        bound = TensorSource(torch.from_numpy(arrays.images), torch.from_numpy(arrays.labels),
                             torch.from_numpy(arrays.logits), batch_size=BATCH, device=torch.device("cpu"))
        train(bound, 1, Path(tmp) / "warm-up")  # first-use costs (allocator, kernels) fall on no one's figure
        tensor_rate, _ = train(bound, args.epochs, Path(tmp) / "tensor")
        results["rows"].append({"path": "tensor", "workers": 0, "images_per_second": tensor_rate, "ratio": 1.0})
        print(f"{'path':<8}{'workers':>8}{'train img/s':>13}{'ratio':>8}{'decode s':>10}{'stream ceiling':>16}")
        print(f"{'tensor':<8}{0:>8}{tensor_rate:>13.0f}{1.0:>8.3f}")
        for n in workers:
            started = time.perf_counter()
            source, _ = shard_source(str(location), arrays.manifest, cache="memory", workers=n, batch_size=BATCH,
                                     seed=0, device=torch.device("cpu"), augment=False, with_logits=True,
                                     progress=False)
            decode = time.perf_counter() - started
            rate, seconds = train(source, args.epochs, Path(tmp) / f"memory{n}")
            overall = args.images * args.epochs / (seconds + decode)  # the one-time decode charged to training
            results["rows"].append({"path": "memory", "workers": n, "images_per_second": rate,
                                    "images_per_second_with_decode": overall, "decode_seconds": decode,
                                    "ratio": rate / tensor_rate, "ratio_with_decode": overall / tensor_rate})
            print(f"{'memory':<8}{n:>8}{rate:>13.0f}{rate / tensor_rate:>8.3f}{decode:>10.2f}"
                  f"   ({overall:.0f} img/s, {overall / tensor_rate:.3f} with the decode)")
            ceiling = stream_ceiling(location, n)
            source, _ = shard_source(str(location), arrays.manifest, cache="stream", workers=n, batch_size=BATCH,
                                     seed=0, device=torch.device("cpu"), augment=False, with_logits=True,
                                     progress=False)
            rate, _seconds = train(source, args.epochs, Path(tmp) / f"stream{n}")
            results["rows"].append({"path": "stream", "workers": n, "images_per_second": rate,
                                    "ratio": rate / tensor_rate, "stream_ceiling_samples_per_second": ceiling})
            print(f"{'stream':<8}{n:>8}{rate:>13.0f}{rate / tensor_rate:>8.3f}{'':>10}{ceiling:>16.0f}")
        # The bound again at the end: on a shared machine, drift shows as a gap between the two.
        again, _ = train(bound, args.epochs, Path(tmp) / "tensor-again")
        results["rows"].append({"path": "tensor (again)", "workers": 0, "images_per_second": again,
                                "ratio": again / tensor_rate})
        print(f"{'tensor':<8}{0:>8}{again:>13.0f}{again / tensor_rate:>8.3f}   (again, at the end)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from atomicio import write_json_atomic

    write_json_atomic(args.out, results, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
