"""Sparse files: copy a file's written regions only, its holes kept as holes.

    from ragtune.retrieval.sparse_files import copy_sparse, data_end

    shutil.copytree(shard, dest, copy_function=copy_sparse)   # a 1 MB Edge index copies as 1 MB, not 220 MB
    data_end(path)                                            # where its last written byte ends (a trailing hole left out)

Qdrant Edge preallocates its mmap files; reader copies (`EdgeStore.open_copy`) and bundles
(`ragtune.bundle`) copy them through here.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterator


def data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each written region of the open file `fd` of `size` bytes, holes left out
    (SEEK_DATA / SEEK_HOLE); from where the file system cannot say on, the rest as one region."""
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    return
                raise
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, pos
    except (AttributeError, OSError):  # no SEEK_DATA here: the rest as written
        if pos < size:
            yield pos, size


def copy_sparse(src: str | Path, dst: str | Path) -> None:
    """Copy a file holding its holes as holes: Qdrant Edge preallocates its mmap files (32 MB pages, a
    WAL segment) that stay mostly unwritten, so a plain copy of a 1 MB index writes 220 MB. Only the
    data regions are copied; the size is set to the source's."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        for start, end in data_regions(fin.fileno(), size):
            fin.seek(start)
            fout.seek(start)
            left = end - start
            while left > 0 and (block := fin.read(min(left, 1 << 20))):
                fout.write(block)
                left -= len(block)
        fout.truncate(size)
    shutil.copystat(src, dst)


def data_end(path: str | Path) -> int:
    """Where a file's last written byte ends: its size less a trailing hole."""
    with open(path, "rb") as f:
        return max((end for _, end in data_regions(f.fileno(), os.fstat(f.fileno()).st_size)), default=0)
