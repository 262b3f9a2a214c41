"""Untrusted input and concurrent use through ``synth`` (issue 18): a resume with other teacher settings, a second
run on a folder another one holds, a TorchScript teacher without the opt-in."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from synthkit import digest, refused, synth, tiny_gmi
from torch import nn

import shards

TINY = tiny_gmi(batch_size=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: torch on one thread here



def test_a_resume_with_other_teacher_settings_is_refused_naming_them(tmp_path: Path, tiny_teacher: Path) -> None:
    out = tmp_path / "set"
    base = ["run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher), *TINY]
    synth(*base, "--num-images", "2")
    before = digest(out)
    names = ",".join(f"kind{i}" for i in range(10))
    message = refused(*base, "--num-images", "4", "--std", "0.3,0.3,0.3", "--class-names", names)
    assert "teacher.std" in message and "teacher.class_names" in message and "nothing was changed" in message
    assert digest(out) == before


def test_a_resume_state_that_loads_but_does_not_fit_is_a_clear_error(tmp_path: Path, tiny_teacher: Path,
                                                                        batch_clock) -> None:
    """A stranger's partial dataset whose resume state is tensors (so ``weights_only`` loads it) of the wrong shape:
    one line saying so, nothing lost, instead of a traceback from deep inside the method."""
    out = tmp_path / "set"
    batch_clock.per_batch = 1.0
    base = ["run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher), "--num-images", "8", *TINY]
    synth(*base, "--time-budget", "1.5s")  # stopped by its budget after 2 of 4 batches: the resume state kept
    state_path = out / shards.read_manifest(out)["resume_state"]
    torch.save({"method": {"batches_done": 2}, "rng": {"torch": torch.get_rng_state()}, "pending": {"count": 0}},
               state_path)
    before = digest(out)
    message = refused(*base, "--time-budget", "1h")
    assert "the saved resume state does not fit this run" in message and "KeyError" in message
    after = digest(out)  # the manifest records the new command; no shard or state lost
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert shards.verify(out) == []


def test_a_run_on_a_folder_another_writer_holds_stops_naming_it(tmp_path: Path, tiny_teacher: Path) -> None:
    from shards.lock import FolderLock

    out = tmp_path / "set"
    out.mkdir()
    holder = FolderLock.acquire(out)  # what a first `synth run` or `synth merge` on this folder holds
    command = ["run", "gmi", "--out", str(out), "--teacher", str(tiny_teacher), "--num-images", "2", *TINY]
    try:
        message = refused(*command)
    finally:
        holder.release()
    assert f"locked by another writer: pid {os.getpid()}" in message
    assert list(out.iterdir()) == []  # the refused run wrote nothing
    synth(*command)
    assert shards.verify(out) == []


class _Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def test_a_torchscript_teacher_needs_trust_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_Scripted().eval()).save(str(path))
    # DeepInversion needs no penultimate features (TorchScript has none) and, with --bn-weight 0, no BN hooks.
    command = ["run", "deepinversion", "--out", str(tmp_path / "set"), "--teacher", str(path), "--mean", "0.5,0.5,0.5",
               "--std", "0.25,0.25,0.25", "--num-images", "2", "--batch-size", "2", "--iterations", "1",
               "--bn-weight", "0", "--shard-size", "2", "--device", "cpu", "--quiet", "--preset", "paper"]
    assert "--trust-torchscript" in refused(*command)
    assert not (tmp_path / "set").exists()
    with pytest.warns(UserWarning, match="runs code"):
        synth(*command, "--trust-torchscript")
    assert shards.verify(tmp_path / "set") == []
