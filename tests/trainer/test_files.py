"""Contracts of `trainer.files`: a replaced file is whole or untouched, never half-written or
left beside a temporary, and has the mode the umask gives a new file (checkpoints included)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import torch

from trainer import checkpoint
from trainer.files import write_atomic, write_atomic_with


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process umask set to the test's parameter, and restored after it."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("umask", "expected"), [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)],
                         indirect=["umask"])
def test_a_written_file_has_the_mode_of_a_new_file(
    tmp_path: Path, umask: int, expected: int
) -> None:
    path = tmp_path / "deep" / "report.html"
    write_atomic(path, b"<p>hello</p>")
    assert path.read_bytes() == b"<p>hello</p>"
    assert mode(path) == expected == 0o666 & ~umask
    assert os.listdir(path.parent) == ["report.html"]


@pytest.mark.parametrize("umask", [0o002], indirect=True)
def test_a_checkpoint_is_group_readable_under_umask_002(tmp_path: Path, umask: int) -> None:
    path = tmp_path / checkpoint.BEST
    checkpoint.save(path, {"epoch": 1, "model": {"w": torch.ones(2)}})
    assert mode(path) & stat.S_IRGRP  # tempfile.mkstemp alone would have left it 0o600
    assert mode(path) == 0o664
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    write_atomic(path, b"old contents")

    def half_then_fail(f: BinaryIO) -> None:
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic_with(path, half_then_fail)
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_a_stream_writer_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    write_atomic(path, b"x" * 10_000)
    write_atomic_with(path, lambda f: [f.write(bytes([i]) * 100) for i in range(3)])
    assert path.read_bytes() == b"\0" * 100 + b"\1" * 100 + b"\2" * 100
