"""Atomic file writes: the one way ltlib writes a file that a killed process must not leave half-written.

The bytes go to a temporary file next to the target (``.<name>.<pid>.<random>.tmp``, created with the
process's umask), are flushed to disk, and the file is renamed over the target with ``os.replace``
(atomic on POSIX): readers see the previous file or the new one, never a part. On any error, an
interrupt included, the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file handle whose contents replace ``path`` when the ``with`` block ends without an error."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("xb") as handle:  # unlike mkstemp's 0600, respects the umask
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_writer(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
