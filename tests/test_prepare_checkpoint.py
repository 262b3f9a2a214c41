"""A killed run's long set-up (D2CIP's stage 1: 10,000 iterations, hours on a CPU at the paper preset) continues
from its last checkpoint instead of starting again, writes exactly what an uninterrupted run writes, and its
seconds still count against the time budget.

The runs charge each stage-1 iteration to a manual clock, and a "kill" is an exception raised inside an
iteration (after the checkpoints before it were written, as a SIGKILL would find them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import shards
from synth.methods.d2cip import D2CIP, D2CIPConfig
from synth.runner import RunOptions, run
from timebudget import ManualClock

TINY = dict(batch_size=8, inversion_steps=1, kd_steps=1, proxy_student="resnet8", memory_capacity=32,
            bank_size=16, latent_dim=16, generator_width=8)
ITERATION_SECONDS = 0.25


class Killed(Exception):
    """Stands in for SIGKILL inside a stage-1 iteration."""


@pytest.fixture
def stage1_clock(monkeypatch):
    """Charges every stage-1 iteration 0.25 s of a manual clock; ``clock.kill_at = n`` kills the n-th iteration
    of a run (counted from 1); ``clock.iterations`` counts the iterations each run did."""
    import synth.runner as runner

    clock = ManualClock()
    clock.kill_at = None
    clock.iterations = 0
    real = D2CIP.stage1_terms

    def charged(self, logits, labels):
        clock.iterations += 1
        clock.advance(ITERATION_SECONDS)
        if clock.iterations == clock.kill_at:
            raise Killed
        return real(self, logits, labels)

    monkeypatch.setattr(D2CIP, "stage1_terms", charged)
    monkeypatch.setattr(runner, "system_clock", clock)
    return clock


def _run(out: Path, teacher, clock, *, iterations: int, checkpoint_seconds: float = 0.5, **options) -> dict:
    clock.iterations = 0
    clock.log = []
    config = D2CIPConfig(**TINY, prior_iterations=iterations)
    return run(D2CIP, config, teacher, RunOptions(out=out, num_images=16, shard_size=8, device="cpu",
                                                  progress=False, precision="fp32",
                                                  checkpoint_seconds=checkpoint_seconds, **options),
               log=clock.log.append)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_a_killed_stage_1_continues_from_its_last_checkpoint_and_writes_what_an_uninterrupted_run_writes(
        tmp_path, calibrated_teacher, stage1_clock):
    clean = tmp_path / "clean"
    _run(clean, calibrated_teacher, stage1_clock, iterations=6)
    assert stage1_clock.iterations == 6

    killed = tmp_path / "killed"
    stage1_clock.kill_at = 6  # checkpoints every 0.5 s, i.e. after iterations 2 and 4: the 6th is lost
    with pytest.raises(Killed):
        _run(killed, calibrated_teacher, stage1_clock, iterations=6)
    saved = _manifest(killed)["prepare_state"]
    assert saved == {"url": "resume/prepare-000001.pt", "seconds": 4 * ITERATION_SECONDS}
    assert [p.name for p in (killed / "resume").iterdir()] == ["prepare-000001.pt"]  # the older one deleted

    stage1_clock.kill_at = None
    _run(killed, calibrated_teacher, stage1_clock, iterations=6)
    assert stage1_clock.iterations == 2  # iterations 5 and 6 only
    assert f"{killed}: continuing the set-up where a killed run saved it (1s of it done)" in stage1_clock.log

    # The same prior, the same samples, and the killed run's stage-1 seconds counted in the first shard's.
    prior = {out.name: torch.load(out / "prior.pt", weights_only=True) for out in (clean, killed)}
    for part in ("prior", "generator"):
        for key, value in prior["clean"][part].items():
            assert torch.equal(value, prior["killed"][part][key]), (part, key)
    first, second = _manifest(clean), _manifest(killed)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    assert first["summary"]["synthesis_seconds"] == second["summary"]["synthesis_seconds"] == 6 * ITERATION_SECONDS
    assert "prepare_state" not in second and not (killed / "resume").exists()
    assert shards.verify(killed) == []


def test_stage_1_seconds_of_a_killed_run_count_against_the_time_budget(tmp_path, calibrated_teacher, stage1_clock):
    """Half of a 4 s budget is stage 1's (8 iterations of 0.25 s), however many runs it takes."""
    out = tmp_path / "budget"
    stage1_clock.kill_at = 6  # 4 iterations (1 s) saved
    with pytest.raises(Killed):
        _run(out, calibrated_teacher, stage1_clock, iterations=1000, time_budget=4.0)
    stage1_clock.kill_at = 4  # killed again: 2 more saved, 6 in all (1.5 s over both runs)
    with pytest.raises(Killed):
        _run(out, calibrated_teacher, stage1_clock, iterations=1000, time_budget=4.0)
    assert _manifest(out)["prepare_state"]["seconds"] == 6 * ITERATION_SECONDS
    stage1_clock.kill_at = None
    _run(out, calibrated_teacher, stage1_clock, iterations=1000, time_budget=4.0)
    assert stage1_clock.iterations == 2  # the 2 iterations left of its 2 s
    manifest = _manifest(out)
    assert manifest["summary"]["prepare"] == {"stage1_iterations": 8, "stage1_iterations_asked": 1000,
                                              "stopped_by": "time_budget"}
    assert manifest["summary"]["synthesis_seconds"] == 8 * ITERATION_SECONDS  # images cost no clock time here


def test_without_checkpoints_a_killed_stage_1_starts_again(tmp_path, calibrated_teacher, stage1_clock):
    """The interval decides: nothing is saved before it has passed (a set-up shorter than it never writes one)."""
    out = tmp_path / "short"
    stage1_clock.kill_at = 6
    with pytest.raises(Killed):
        _run(out, calibrated_teacher, stage1_clock, iterations=6, checkpoint_seconds=300)
    assert "prepare_state" not in _manifest(out)
    stage1_clock.kill_at = None
    _run(out, calibrated_teacher, stage1_clock, iterations=6, checkpoint_seconds=300)
    assert stage1_clock.iterations == 6


def test_set_up_progress_that_loads_but_does_not_fit_is_a_clear_error(tmp_path, calibrated_teacher, stage1_clock):
    out = tmp_path / "foreign"
    stage1_clock.kill_at = 6
    with pytest.raises(Killed):
        _run(out, calibrated_teacher, stage1_clock, iterations=6)
    state = out / _manifest(out)["prepare_state"]["url"]
    torch.save({"method": {"iterations_done": 3}, "rng": {"torch": torch.get_rng_state()}}, state)  # no weights
    stage1_clock.kill_at = None
    with pytest.raises(shards.ShardError, match="the saved set-up progress does not fit this run .*KeyError"):
        _run(out, calibrated_teacher, stage1_clock, iterations=6)
    assert stage1_clock.iterations == 0
