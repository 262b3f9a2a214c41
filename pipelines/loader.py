"""Does the loader starve the trainer? WRN-16-1 training images/s from shards against a tensor in memory.

    python -m pipelines.loader [--images 4096] [--epochs 2] [--workers 1,2] [--rounds 3] [--out FILE.json]

Writes a shard dataset of real FMNIST-32 training images (one-hot "teacher" logits: the content does not
change the speed) and trains a WRN-16-1 student with ``distill``'s own loop (:func:`distill.train.fit`, KD from
stored logits, batch 128, no evaluation) from:

- ``tensor``: a uint8 tensor already in memory (:class:`distill.data.TensorSource`): the bound;
- ``memory``: ``distill run --cache memory``: the shards decoded by :func:`shards.load_arrays` with N workers,
  then the same tensor source (the decode is paid once; the figure counts it against the training time);
- ``stream``: ``distill run --cache stream``: WebDataset streaming, verified, decoded in N ``DataLoader``
  workers while the trainer runs.

Paths take turns in rounds, each round between two ``tensor`` runs; a path's ratio is its rate over the mean of
its round's two (a shared machine drifts by more than the effect measured). For each it prints training images/s
and the median ratio with its range over the rounds; for the streaming path also how fast the
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
from distill.objectives import StoredLogitsKD
from distill.sources import shard_source
from distill.train import LoopConfig, fit

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


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each round measures every path once, beside a tensor run of its own: on a shared "
                             "machine the ratio to the neighbouring tensor run is what drifts least")
    parser.add_argument("--out", type=Path, default=Path("pipelines/results/loader.json"))
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    results: dict[str, Any] = {"images": args.images, "epochs": args.epochs, "batch_size": BATCH,
                               "student": "wrn16_1", "cpu_count": os.cpu_count(), "rounds": args.rounds,
                               "torch_threads": torch.get_num_threads(), "rows": []}
    rates: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    extra: dict[tuple[str, int], list[float]] = {}
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        location = write_dataset(Path(tmp) / "set", args.images)
        arrays = shards.load_arrays(location, progress=False)
        bound = TensorSource(torch.from_numpy(arrays.images), torch.from_numpy(arrays.labels),
                             torch.from_numpy(arrays.logits), batch_size=BATCH, device=cpu)
        train(bound, 1, Path(tmp) / "warm-up")  # first-use costs (allocator, kernels) fall on no one's figure
        for n in workers:
            extra[("ceiling", n)] = [stream_ceiling(location, n)]
        for r in range(args.rounds):
            tensor_before, _ = train(bound, args.epochs, Path(tmp) / f"tensor{r}a")
            measured: dict[tuple[str, int], float] = {}
            for n in workers:
                started = time.perf_counter()
                source, _ = shard_source(str(location), arrays.manifest, cache="memory", workers=n,
                                         batch_size=BATCH, seed=0, device=cpu, augment=False, with_logits=True,
                                         progress=False)
                decode = time.perf_counter() - started
                rate, seconds = train(source, args.epochs, Path(tmp) / f"memory{n}-{r}")
                measured[("memory", n)] = rate
                # The one-time decode charged to training.
                extra.setdefault(("memory+decode", n), []).append(args.images * args.epochs / (seconds + decode))
                source, _ = shard_source(str(location), arrays.manifest, cache="stream", workers=n,
                                         batch_size=BATCH, seed=0, device=cpu, augment=False, with_logits=True,
                                         progress=False)
                measured[("stream", n)], _ = train(source, args.epochs, Path(tmp) / f"stream{n}-{r}")
            tensor_after, _ = train(bound, args.epochs, Path(tmp) / f"tensor{r}b")
            reference = (tensor_before + tensor_after) / 2
            rates.setdefault(("tensor", 0), []).extend([tensor_before, tensor_after])
            for key, rate in measured.items():
                rates.setdefault(key, []).append(rate)
                ratios.setdefault(key, []).append(rate / reference)
            for n in workers:
                ratios.setdefault(("memory+decode", n), []).append(extra[("memory+decode", n)][-1] / reference)
            print(f"round {r + 1}/{args.rounds}: tensor {tensor_before:.0f} / {tensor_after:.0f} img/s; "
                  + ", ".join(f"{p} x{n} {v / reference:.3f}" for (p, n), v in measured.items()), flush=True)
    print(f"\n{'path':<15}{'workers':>8}{'train img/s':>13}{'ratio (median, min-max)':>28}")
    print(f"{'tensor':<15}{0:>8}{_median(rates[('tensor', 0)]):>13.0f}{'1.000':>28}")
    results["rows"].append({"path": "tensor", "workers": 0, "images_per_second": _median(rates[("tensor", 0)]),
                            "runs": rates[("tensor", 0)], "ratio": 1.0})
    for path in ("memory", "memory+decode", "stream"):
        for n in workers:
            values = ratios[(path, n)]
            rate = _median(rates[(path, n)]) if (path, n) in rates else _median(extra[(path, n)])
            row = {"path": path, "workers": n, "images_per_second": rate, "ratio": _median(values),
                   "ratios": values}
            if path == "stream":
                row["stream_ceiling_samples_per_second"] = extra[("ceiling", n)][0]
            results["rows"].append(row)
            spread = f"{_median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
            print(f"{path:<15}{n:>8}{rate:>13.0f}{spread:>28}")
    for n in workers:
        print(f"stream ceiling with {n} worker(s), trainer idle: {extra[('ceiling', n)][0]:.0f} samples/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from atomicio import write_json_atomic

    write_json_atomic(args.out, results, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
