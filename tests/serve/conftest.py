"""Exports of the shared finished study, made once per test session by the real `hpo export`:
the best trial in every format, and an ensemble of the top 3 with its ONNX file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import hpo


@pytest.fixture(scope="session")
def exports(finished_study: tuple[str, Path]) -> dict[str, Path]:
    url, cwd = finished_study
    out = {"single": cwd / "export-single", "ensemble": cwd / "export-top3"}
    for name, extra in (("single", ["--format", "all"]),
                        ("ensemble", ["--top", "3", "--format", "onnx"])):
        run = hpo("export", "done", "--out", str(out[name]), *extra, url=url, cwd=cwd)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "matches PyTorch" in run.stdout, run.stdout
    return out
