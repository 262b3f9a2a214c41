"""Helpers of the tests that drive the ``synth`` command line in-process: a run that must succeed, one that
must be refused with a user error, and a folder's content by file."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from synth.commands.cli import main


def tiny_gmi(batch_size: int) -> list[str]:
    """gMI options small enough for a run of a few images in seconds (the paper preset, so nothing is scaled)."""
    return ["--batch-size", str(batch_size), "--inversion-steps", "1", "--kd-steps", "1", "--proxy-student",
            "resnet8", "--latent-dim", "16", "--generator-width", "8", "--memory-capacity", "32", "--shard-size",
            "2", "--device", "cpu", "--quiet", "--preset", "paper"]


def synth(*args: str) -> str:
    """``synth ARGS``; its output, after asserting that it succeeded."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args: str) -> str:
    """``synth ARGS``; its output, after asserting that it stopped with a one-line user error (exit 1)."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    return result.output


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative name: what a refused command must leave unchanged."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
