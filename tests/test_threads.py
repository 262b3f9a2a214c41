"""The commands run one thread per free core: a core held by other work gets no thread of ours (zoo/threads.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from zoo import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _stat(path, busy_idle: list[tuple[int, int]]) -> None:
    """A /proc/stat whose cores have (busy, idle) jiffies."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0" for i, (busy, idle) in enumerate(busy_idle)]
    path.write_text("\n".join(lines) + "\n")


def test_free_cores_counts_the_idle_share_of_this_process_cores(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    samples = iter([[(100, 100), (100, 100)], [(200, 100), (100, 200)]])  # core 0 busy, core 1 idle
    monkeypatch.setattr(threads.time, "sleep", lambda s: _stat(stat, next(samples)))
    _stat(stat, next(samples))
    assert threads.free_cores(stat=stat) == pytest.approx(1.0)


def test_one_busy_core_of_two_leaves_one_thread_and_says_so(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(2)
    said = []
    assert threads.fit_threads_to_free_cores(said.append, free=1.05) == 1
    assert torch.get_num_threads() == 1 and "1 of 2 cores busy" in said[0]
    torch.set_num_threads(2)
    assert threads.fit_threads_to_free_cores(said.append, free=1.9) == 2 and len(said) == 1  # quiet: unchanged


def test_a_users_thread_count_and_a_gpu_are_left_alone(monkeypatch, restore_threads):
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.fit_threads_to_free_cores(print, free=0.2) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert threads.fit_threads_to_free_cores(print, free=0.2) == 2


def test_the_console_commands_fit_their_threads_before_they_run_but_not_for_help(monkeypatch):
    import distill.cli
    import synth.commands.cli

    for module, command in ((synth.commands.cli, ["synth", "run", "gmi"]), (distill.cli, ["distill", "run"])):
        for argv, want in ((command, ["fit", "main"]), (command + ["--help"], ["main"]), (command[:1], ["main"])):
            calls: list[str] = []
            monkeypatch.setattr(threads, "fit_threads_to_free_cores", lambda log, calls=calls: calls.append("fit"))
            monkeypatch.setattr(module, "main", lambda calls=calls: calls.append("main"))
            monkeypatch.setattr(sys, "argv", argv)
            module.entry()
            assert calls == want, argv
