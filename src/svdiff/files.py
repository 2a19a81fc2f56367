"""Writing a file so that readers see the old one or the new one, never a partial one (standard library only)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(file: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside `file` for the block to write; when the block ends without an error, the
    temporary file is flushed to disk and replaces `file` in one step, else it is removed. Creates the folder."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, in the same folder: os.replace is then a rename within one filesystem, hence atomic, and a crash
    # leaves at most a `.name.<random>.tmp` beside it.
    temp = file.with_name(f".{file.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield temp
        with open(temp, "rb+") as f:  # on disk before the rename, or a power cut could leave an empty `file`
            os.fsync(f.fileno())
        os.replace(temp, file)
    finally:
        temp.unlink(missing_ok=True)


def write_atomic(file: str | os.PathLike, payload: bytes) -> None:
    """`file` holds `payload`, written through `atomic_path`."""
    with atomic_path(file) as temp, open(temp, "xb") as f:
        f.write(payload)
