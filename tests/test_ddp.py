"""``torchrun`` distillation on the CPU (gloo, 2 processes of 1 thread): the same accuracy as 1 process at the
same global batch, even batches on every rank (memory and streaming), rank-0-only outputs, and resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import realdata
import shards
from distill.cli import main
from distill.distributed import Distributed

needs_fmnist = pytest.mark.skipif(
    not (realdata.fmnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
N, GLOBAL_BATCH, EPOCHS = 2000, 64, 3
COMMON = ["--student", "lenet5", "--batch-size", str(GLOBAL_BATCH), "--epochs", str(EPOCHS), "--eval-every",
          str(EPOCHS), "--eval-data", "fmnist32", "--max-eval-samples", "1000", "--workers", "0", "--quiet"]


def test_every_rank_gets_the_same_number_of_batches_and_together_the_whole_set():
    order = torch.randperm(101, generator=torch.Generator().manual_seed(0))
    ranks = [Distributed(rank=r, world=2) for r in (0, 1)]
    train = [env.split(order, 8, training=True) for env in ranks]
    assert [len(b) for b in train] == [7, 7]  # 6 global batches of 16, then 5 left: each rank gets 3 or 2
    assert [len(b) for b in train[0]] == [8] * 6 + [3] and [len(b) for b in train[1]] == [8] * 6 + [2]
    seen = torch.cat([torch.cat(b) for b in train])
    assert sorted(seen.tolist()) == list(range(101))
    # Global step s holds exactly the 1-process batch s.
    assert sorted(torch.cat([train[0][2], train[1][2]]).tolist()) == sorted(order[32:48].tolist())
    # A last global batch that cannot give every rank 2 samples is dropped in training, kept in evaluation.
    assert [env.steps(99, 8, training=True) for env in ranks] == [6, 6]
    assert [len(env.split(torch.arange(99), 8, training=False)) for env in ranks] == [7, 7]


@pytest.fixture(scope="module")
def fmnist_set(tmp_path_factory) -> Path:
    """N real FMNIST-32 training images with a confident 'teacher' (the true label at +4, the rest at 0)."""
    ds = realdata.load("fmnist32", split="train").subset(N, seed=0)
    images = ds.uint8_nhwc().numpy()
    logits = np.zeros((N, 10), np.float16)
    logits[np.arange(N), ds.labels] = 4
    mean, std = realdata.NORMALIZATION["fmnist32"]
    out = tmp_path_factory.mktemp("ddp") / "fmnist"
    writer = shards.ShardWriter.open(out, identity={"method": "real"}, header={"teacher": {
        "mean": list(mean), "std": list(std), "class_names": ds.class_names}}, target_samples=N, shard_size=250)
    for start in range(0, N, 250):
        writer.commit_shard([shards.Sample(f"{i:09d}", images[i], int(ds.labels[i]), logits[i])
                             for i in range(start, start + 250)])
    writer.finish({})
    return out


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "distill", "run", *args], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@needs_fmnist
def test_two_gloo_processes_match_one_process_and_resume(fmnist_set, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = CliRunner().invoke(main, ["run", "--shards", str(fmnist_set), "--out", str(tmp_path / "one"),
                                        "--cache", "memory", *COMMON], catch_exceptions=False)
    finally:
        torch.set_num_threads(before)
    assert one.exit_code == 0, one.output
    done = torchrun("--shards", str(fmnist_set), "--out", str(tmp_path / "two"), "--cache", "memory", *COMMON)
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    print(f"\n1 process: {m1['final_accuracy']:.4f} at {m1['images_per_second']:.0f} images/s; "
          f"2 gloo processes: {m2['final_accuracy']:.4f} at {m2['images_per_second']:.0f} images/s")
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m1["final_accuracy"] > 0.5 and abs(m1["final_accuracy"] - m2["final_accuracy"]) <= 0.05
    # The same images per epoch (the whole set, split evenly), counted over both ranks.
    assert m1["train_images"] == m2["train_images"] == EPOCHS * N
    # Rank 0 alone wrote: one log row per epoch, no stray temporaries.
    with open(tmp_path / "two" / "log.csv") as fh:
        assert [int(row["epoch"]) for row in csv.DictReader(fh)] == [1, 2, 3]
    assert not list((tmp_path / "two").glob("*.tmp"))

    # Resume under torchrun, one more epoch, streaming: resampled shards, N // 2 // 32 = 31 batches per rank.
    torchrun("--shards", str(fmnist_set), "--out", str(tmp_path / "two"), "--cache", "stream", "--resume",
             *COMMON[:4], "--epochs", str(EPOCHS + 1), *COMMON[6:])
    resumed = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert resumed["epochs_this_process"] == 1 and resumed["data_path"] == "stream"
    assert resumed["train_images"] == EPOCHS * N + 31 * 32 * 2
    assert resumed["final_accuracy"] > 0.5
    with open(tmp_path / "two" / "log.csv") as fh:
        assert [int(row["epoch"]) for row in csv.DictReader(fh)] == [1, 2, 3, 4]
