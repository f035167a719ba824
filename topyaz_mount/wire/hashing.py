"""blake3 of whole files, shared by the client's index and the agent's store.

Mapped a window at a time: mapping a whole 10 GB input would count every page against
the process's resident memory (the agent must stay small whatever the file size),
while copying it through read() is about three times slower than hashing it in place.
blake3 spreads each window over all cores.
"""

from __future__ import annotations

import mmap
import os

import blake3

WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


def hash_fd(fd: int) -> bytes:
    """The digest of an open file's whole content, without moving its offset."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        length = min(WINDOW, size - offset)
        with mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=offset) as window:
            hasher.update(window)
        offset += length
    return hasher.digest()
