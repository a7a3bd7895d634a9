"""Drop one file's pages from the page cache, so its next read comes from the disk (tests, benchmarks)."""

from __future__ import annotations

import os
import pathlib


def evict_from_page_cache(path: pathlib.Path | str) -> None:
    """Write back and drop `path`'s cached pages (POSIX_FADV_DONTNEED; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
