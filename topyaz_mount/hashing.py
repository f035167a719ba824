"""blake3 of whole files, shared by the client's index and the agent's store.

Read in large blocks rather than mmapped: mapping a 10 GB input would count every page
against the process's resident memory, and the agent must stay small whatever the file
size. blake3 still spreads each block over all cores.
"""

from __future__ import annotations

import os

import blake3

BLOCK = 16 << 20


def hash_fd(fd: int) -> bytes:
    """The digest of an open file's whole content, without moving its offset."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    offset = 0
    while True:
        block = os.pread(fd, BLOCK, offset)
        if not block:
            return hasher.digest()
        hasher.update(block)
        offset += len(block)
