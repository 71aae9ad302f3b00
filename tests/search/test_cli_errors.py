"""Bad command-line input: one clear line on stderr, a non-zero exit, no traceback, and nothing
created on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import hpo, tiny_space

CASES = {
    "no database yet": (["status", "nosuch"], "holds no studies"),
    "unknown study": (["status", "nosuch"], "no study named 'nosuch'"),
    "malformed URL": (["status", "x", "--storage", "not a url"], "malformed"),
    "unreachable database": (
        ["status", "x", "--storage", "postgresql://u:secret@127.0.0.1:1/db"], "Connection refused"),
    "missing SQLite folder": (
        ["status", "x", "--storage", "sqlite:////nonexistent/dir/h.db"], "does not exist"),
    "unknown device": (["worker", "--study", "x", "--device", "gpu7"], "device: 'gpu7'"),
    "absent CUDA device": (["worker", "--study", "x", "--device", "cuda:3"], "cuda:3"),
    "bad study name": (["create", "--space", "SPACE", "--study", "a b/c"], "study name"),
    "bad number in the environment": (["worker", "--study", "x"],
                                      "HPO_STOPPED_EXIT_CODE='abc' is not a whole number"),
    "exit status out of range": (["worker", "--study", "x", "--stopped-exit-code", "300"],
                                 "--stopped-exit-code 300: an exit status is 0 to 255"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_cli_input_is_one_clear_line(case: str, tmp_path: Path) -> None:
    args, expected = CASES[case]
    space = tiny_space(tmp_path / "s.toml")
    args = [str(space) if a == "SPACE" else a for a in args]
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    if case == "unknown study":  # a storage that holds another study
        assert hpo("create", "--space", str(space), "--study", "other", url=url,
                   cwd=tmp_path).returncode == 0
    before = sorted(os.listdir(tmp_path))
    env = {"HPO_STOPPED_EXIT_CODE": "abc"} if case == "bad number in the environment" else {}
    result = hpo(*args, url=url, cwd=tmp_path, timeout=120, **env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("hpo: error:"), lines
    assert "secret" not in result.stderr
    # No database file appears, no artifacts folder (SQLite's -shm/-wal files of an existing
    # database come and go with its readers).
    after = [f for f in sorted(os.listdir(tmp_path)) if not f.endswith(("-shm", "-wal"))]
    assert after == [f for f in before if not f.endswith(("-shm", "-wal"))]
