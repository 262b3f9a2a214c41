"""``distill --time-budget``: the plan is made again at every epoch boundary from the recent epochs, the cosine
schedule is re-laid over it, and the run ends within one epoch of its budget.

Every test here charges its work to a :class:`timebudget.ManualClock` (so many seconds per batch, slower in the
epochs it chooses) instead of reading the machine's clock: a fast and a loaded machine decide exactly alike.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import distill.runs as runs
import realdata
import shards
import zoo
from distill.budget import CosineSchedule, EpochBudget, cosine_lr
from distill.data import TensorSource
from distill.objectives import StoredLogitsKD
from distill.runs import RunOptions, distill_from_shards
from distill.train import LoopConfig, fit
from timebudget import Deadline, ManualClock

needs_fmnist = pytest.mark.skipif(
    not (realdata.fmnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
N, BATCH = 128, 32  # 4 steps an epoch
PER_BATCH = 0.0625  # clock seconds a training batch costs on the "quiet machine": 0.25 s an epoch (exact in binary)
RUN_N = 64  # distill run: 2 steps an epoch, PER_BATCH * 2 clock seconds

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: torch on one thread here


class Throttled:
    """A batch source that charges ``per_batch`` clock seconds per batch, ``slow[epoch]`` times more in the
    epochs named there (the test's stand-in for a loaded machine)."""

    def __init__(self, source, clock: ManualClock, per_batch: float, slow: dict[int, float] | None = None):
        self.source, self.clock, self.per_batch, self.slow = source, clock, per_batch, slow or {}
        self.num_samples = source.num_samples

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, epoch: int):
        for batch in self.source.epoch(epoch):
            self.clock.advance(self.per_batch * self.slow.get(epoch, 1.0))
            yield batch


def _source() -> TensorSource:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(N, 8, 8, 3), dtype=np.uint8))
    logits = torch.from_numpy(rng.normal(size=(N, 10)).astype(np.float32))
    return TensorSource(images, logits.argmax(1), logits, batch_size=BATCH, device=torch.device("cpu"), seed=0)


def _fit(tmp_path: Path, budget: float, slow: dict[int, float] | None = None, epochs: int = 100):
    clock = ManualClock()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))  # the loop, not the model
    result = fit(model, Throttled(_source(), clock, PER_BATCH, slow), StoredLogitsKD(4.0),
                 LoopConfig(epochs=epochs, batch_size=BATCH), device=torch.device("cpu"), out_dir=tmp_path,
                 run_config={"job": "test"}, progress=False, deadline=Deadline(budget, clock=clock))
    return result, clock.now


# ------------------------------------------------------------------------------------------ units


def test_schedule_without_a_replan_is_the_classic_cosine_and_a_replan_continues_without_a_jump():
    schedule = CosineSchedule(0.1, 400)
    assert all(schedule.lr(s) == cosine_lr(0.1, s, 400) for s in range(0, 401, 7))  # bit for bit
    before = schedule.lr(40)
    schedule.relay(40, 100)  # the budget now fits 100 steps in all instead of 400
    assert schedule.lr(40) == pytest.approx(before)
    rates = [schedule.lr(s) for s in range(40, 101)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] == pytest.approx(0, abs=1e-12)
    resumed = CosineSchedule.resumed(schedule.state_dict(), 0.1, 60, 100)
    assert resumed.lr(60) == schedule.lr(60) and resumed.lr(100) == pytest.approx(0, abs=1e-12)


def test_the_next_epoch_is_estimated_from_the_recent_ones_not_the_first():
    clock = ManualClock()
    budget = EpochBudget(Deadline(8.0, clock=clock), requested=1000)
    clock.advance(2.5)
    budget.observe_epoch(2.5, 128)
    # One slow epoch: 3 fit at its cost, but the learning rate is laid over at least 3 more, not annealed in 2.
    assert budget.plan(done=1, current=1000) == (3, 4)
    for seconds in (0.25, 0.25):
        clock.advance(seconds)
        budget.observe_epoch(seconds, 128)
    assert budget.epoch_seconds() == 0.25  # the median of the last three, not the first epoch
    assert budget.plan(done=3, current=3) == (3 + 20, 3 + 20)  # 5 s left at 0.25 s an epoch
    clock.advance(4.6)
    budget.observe_epoch(0.25, 128)
    assert budget.plan(done=4, current=23) == (5, 5) and budget.final  # the next is the last: anneal in it
    assert budget.plan(done=5, current=5) == (5, 5)


# ------------------------------------------------------------------------------------------ the loop


def test_a_first_epoch_ten_times_slower_still_uses_the_budget(tmp_path):
    quiet, quiet_used = _fit(tmp_path / "quiet", 8.0)
    slow, slow_used = _fit(tmp_path / "slow", 8.0, slow={0: 10.0})  # epoch 1: 2.5 s instead of 0.25 s
    assert quiet.planned_epochs == 32 and quiet_used == 8.0
    # A plan made from the first epoch alone fits 3 epochs in 8 s and stops after 3 s.
    assert slow_used >= 0.8 * 8.0, (slow.planned_epochs, slow_used)
    assert slow_used <= 8.0 + 0.25  # within one epoch of the budget
    assert slow.planned_epochs > quiet.planned_epochs / 2
    assert len(slow.history) == slow.planned_epochs and slow.budget["used_seconds"] == pytest.approx(slow_used)
    assert slow.budget["plans"][0]["epochs"] == 3  # re-planned at each boundary as it learnt the speed
    # The learning rate was not spent on the pessimistic first plan: the third epoch still starts above half of it.
    assert slow.history[2]["lr"] > 0.05 and slow.history[-1]["lr"] < 0.01


def test_load_arriving_mid_run_ends_within_one_epoch_of_the_budget(tmp_path):
    slow = {e: 4.0 for e in range(5, 100)}  # from epoch 6 on every epoch takes 1 s instead of 0.25 s
    result, used = _fit(tmp_path, 8.0, slow=slow)
    assert 0.8 * 8.0 <= used <= 8.0 + 1.0, (result.planned_epochs, used)  # a plan made once would need 32 s
    # The learning rate still anneals to zero at the end the last plan laid out.
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    state = {k: v for k, v in ckpt["scheduler"].items() if k in ("base_lr", "total_steps", "anchor_step",
                                                                   "anchor_progress")}
    schedule = CosineSchedule(**state)
    assert schedule.total_steps == 4 * result.planned_epochs and schedule.lr(schedule.total_steps) < 1e-12


# ------------------------------------------------------------------------------------------ distill run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    teacher = zoo.Classifier(zoo.build_model("resnet8", 10, 3), (0.5,) * 3, (0.25,) * 3)
    images = np.random.default_rng(0).integers(0, 256, size=(RUN_N, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = teacher(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    out = tmp_path_factory.mktemp("data") / "ds"
    writer = shards.ShardWriter.open(out, identity={"method": "test"}, header={"teacher": teacher.card.to_dict()},
                                     target_samples=RUN_N, shard_size=RUN_N)
    writer.commit_shard([shards.Sample(f"{i:09d}", images[i], int(logits[i].argmax()),
                                       logits[i].astype(np.float16), {}) for i in range(RUN_N)])
    writer.finish({})
    return out


def _distill(dataset: Path, out: Path, monkeypatch, *, budget: float, covers: str = "all", eval_cost: float = 0.0,
             slow: dict[int, float] | None = None, **options) -> dict:
    """``distill run`` with the training batches and evaluation batches charged to a manual clock."""
    clock = ManualClock()
    real_shard_source, real_source = runs.shard_source, runs.real_source
    monkeypatch.setattr(runs, "shard_source", lambda *a, **k: (
        Throttled(real_shard_source(*a, **k)[0], clock, 2 * PER_BATCH, slow), "memory"))
    monkeypatch.setattr(runs, "real_source", lambda *a, **k: Throttled(real_source(*a, **k), clock, eval_cost))
    opts = RunOptions(shards=str(dataset), student="resnet8", out=out, loop=LoopConfig(epochs=500, batch_size=BATCH,
                      eval_every=1), time_budget=budget, budget_covers=covers, workers=0, progress=False,
                      clock=clock, **options)
    distill_from_shards(opts)
    return json.loads((out / "metrics.json").read_text())


@needs_fmnist
def test_run_records_planned_and_used_seconds_and_anneals_over_the_plan(dataset, tmp_path, monkeypatch):
    out = tmp_path / "budget"
    metrics = _distill(dataset, out, monkeypatch, budget=2.0, eval_data="fmnist32", max_eval_samples=100,
                       progress_eval_samples=50)
    record = metrics["time_budget"]
    assert metrics["epochs_requested"] == 500 and metrics["epochs"] == 8  # 2 s at 0.25 s an epoch
    assert record["budget_seconds"] == 2.0 and 0.8 * 2.0 <= record["used_seconds"] <= 2.0 + 0.25
    assert record["planned_seconds"] == pytest.approx(record["used_seconds"], abs=0.25) and record["plans"]
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert len(rows) == metrics["epochs"] and rows[-1]["eval_acc"] != ""  # the final evaluation happened
    lrs = [float(row["lr"]) for row in rows]
    assert lrs[0] == pytest.approx(0.1, rel=1e-3) and all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] < 0.02  # the last epoch starts near the end of the annealing, not 0.1 of a 500-epoch schedule


@needs_fmnist
def test_budget_covering_training_gives_evaluation_time_back(dataset, tmp_path, monkeypatch):
    # Each evaluation costs 1 clock second: evaluating after every epoch would take most of an "all" budget.
    common = dict(budget=2.0, eval_cost=1.0, eval_data="fmnist32", max_eval_samples=64, progress_eval_samples=64)
    training = _distill(dataset, tmp_path / "training", monkeypatch, covers="training", **common)
    everything = _distill(dataset, tmp_path / "all", monkeypatch, covers="all", **common)
    record = training["time_budget"]
    assert training["time_budget_covers"] == "training" and not record["charge_evaluations"]
    assert 0.8 * 2.0 <= record["used_seconds"] <= 2.0 + 0.25 and training["epochs"] == 8  # training fills it
    assert training["eval_seconds"] >= training["epochs"] * 1.0  # every evaluation was timed and reported
    assert everything["time_budget"]["used_seconds"] <= 2.0 + 1.25  # evaluations charged: within an epoch + eval
    assert everything["epochs"] < training["epochs"]
