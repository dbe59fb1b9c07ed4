"""Shared-memory segments that hold image bytes and image embeddings.

A segment is a file in /dev/shm (the tmpfs behind POSIX `shm_open` on Linux), named from a
per-instance prefix and the cache record id, so every process of one server instance can find
a record's bytes and embedding from the record id alone, and two instances never collide.

Only the cache manager creates and unlinks segments; the httpserver, the visual server and the
backend open existing ones to write or read them. Plain file I/O on tmpfs is a memcpy to or
from the page cache, like reading an mmap, without the mapping bookkeeping (and, unlike
`multiprocessing.shared_memory`, without a resource tracker that unlinks segments behind the
owner's back when an attaching process exits).

Names never contain a path separator, and segments are opened with O_NOFOLLOW: /dev/shm is
world-writable, so a planted symlink must not redirect a write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Union

SHM_DIR = Path("/dev/shm")

Buffer = Union[bytes, bytearray, memoryview]


def segment_prefix(run_dir: str) -> str:
    """The name prefix of one instance's segments, derived from its private run directory.

    `RunPaths.create` makes the run directory with `mkdtemp(prefix="lightserve-")`, whose random
    suffix is unique on the host while the instance runs; every process of the instance knows
    the run directory, so none needs to be told the prefix.
    """
    suffix = os.path.basename(os.path.normpath(run_dir)).removeprefix("lightserve-")
    return f"lightserve_{suffix}_"


def data_name(prefix: str, record_id: int) -> str:
    """Segment holding the raw (encoded) image bytes of a record."""
    return f"{prefix}{record_id}_data"


def embed_name(prefix: str, record_id: int) -> str:
    """Segment holding a record's image embedding: float32 [token_num, hidden], row-major."""
    return f"{prefix}{record_id}_embed"


def _path(name: str) -> Path:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"invalid segment name {name!r}")
    return SHM_DIR / name


def create(name: str, nbytes: int) -> None:
    """Create a zero-filled segment of `nbytes`; fails if the name exists (O_EXCL)."""
    fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    os.close(fd)


def write(name: str, data: Buffer) -> None:
    """Fill an existing segment from the start with `data` (which must fit exactly)."""
    fd = os.open(_path(name), os.O_WRONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        view = memoryview(data).cast("B")
        if view.nbytes != size:
            raise ValueError(f"segment {name} holds {size} bytes, got {view.nbytes}")
        written = 0
        while written < size:
            written += os.write(fd, view[written:])
    finally:
        os.close(fd)


def _read_all(fd: int, name: str, view: memoryview) -> None:
    done = 0
    while done < view.nbytes:
        n = os.readv(fd, [view[done:]])
        if n == 0:
            raise EOFError(f"segment {name} shrank while being read")
        done += n


def read_into(name: str, out: Buffer) -> None:
    """Read a whole segment into the writable buffer `out`, which must have its exact size."""
    fd = os.open(_path(name), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        view = memoryview(out).cast("B")
        if view.nbytes != size:
            raise ValueError(f"segment {name} holds {size} bytes, expected {view.nbytes}")
        _read_all(fd, name, view)
    finally:
        os.close(fd)


def read(name: str) -> bytes:
    """The whole content of a segment."""
    fd = os.open(_path(name), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        buf = bytearray(os.fstat(fd).st_size)
        _read_all(fd, name, memoryview(buf))
    finally:
        os.close(fd)
    return bytes(buf)


def exists(name: str) -> bool:
    return _path(name).exists()


def unlink(name: str) -> None:
    """Remove a segment; a missing one is fine (already gone). Open readers keep their data."""
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def list_segments(prefix: str) -> Iterator[str]:
    """Names of the segments in /dev/shm that start with `prefix`."""
    return (p.name for p in SHM_DIR.glob(prefix + "*") if p.name.startswith(prefix))


def unlink_all(prefix: str) -> int:
    """Remove every segment of one instance (shutdown); returns how many there were."""
    names = list(list_segments(prefix))
    for name in names:
        unlink(name)
    return len(names)
