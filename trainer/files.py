"""The one way the project replaces a file: atomically, with the mode any new file would get.

Torch-free, so the search side (reports) uses it too. A reader sees the old file or the new
one, never half of either: the data goes to a temporary file in the same folder (a rename
within one filesystem is atomic), is fsynced, and then replaces the target. The temporary file
is created with mode 0o666 and O_EXCL, so the kernel applies the umask (or the folder's
default ACL) exactly as for any new file: a checkpoint or export is as readable by the group
as the reports beside it, where tempfile.mkstemp would leave it 0o600 whatever the umask.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_ATTEMPTS = 16  # unique names collide only with a leftover of a writer killed mid-write


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically; its folder is created if missing."""
    write_atomic_with(path, lambda f: f.write(data))


def write_atomic_with(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` atomically with what `write` writes into the open binary file it is
    given (e.g. `lambda f: torch.save(obj, f)`, which streams without a copy in memory). If
    `write` or anything after it fails, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new, empty file beside `path`, hidden (a dot name) and unique to this writer (pid and
    a random tag: two processes writing one target never share it); and its descriptor."""
    for _ in range(_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {str(path)!r}")
