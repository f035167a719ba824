"""End to end on both backends: the FUSE mount and the staged tree (issue 13).

The key jobs of tests/test_exec_e2e.py run on both (products byte-identical to a local
run, a batch, Unicode names, exit status, Ctrl-C); the rest checks what is the stage
backend's own: inputs copied over (warm ones moving no bytes), outputs going home
while the job runs, a job that writes into an input leaving the content store alone,
`--include`, sessions restaging local edits, and `auto` choosing to stage on a host
whose FUSE cannot be used.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import blake3
import pytest
from e2e_util import (
    describe,
    remote_home,
    run_exec,
    session_dirs,
    sessions_dir,
    start_exec,
    wait_until,
)
from test_exec_e2e import FFMPEG_ARGS, UNICODE_NAME, digests, local_copy, run_local, standin

pytestmark = pytest.mark.e2e

__all__ = ["local_copy"]  # a fixture, imported for the tests below

BACKENDS = ["fuse", "stage"]


def run_on(testhost, root, backend: str, *command, options=(), **kwargs):
    return run_exec(testhost, root, *command, options=["--backend", backend, *options], **kwargs)


def stats_of(r: subprocess.CompletedProcess) -> dict:
    for line in reversed(r.stderr.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no --stats=json line: {describe(r)}")


# --------------------------------------------------------------------------- both backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_job_with_a_unicode_name_matches_local(testhost, client_root, local_copy, backend):
    src = client_root / UNICODE_NAME
    r = run_on(testhost, client_root, backend, "tpai", "--cli", src, "-o", "out",
               options=["--stats=json"])
    assert r.returncode == 0, describe(r)
    assert stats_of(r)["backend"] == backend
    run_local(*standin("tpai"), "--cli", local_copy / UNICODE_NAME, "-o", local_copy / "out",
              cwd=local_copy)
    assert digests(client_root / "out") == digests(local_copy / "out")
    assert (client_root / "out" / UNICODE_NAME).read_bytes() == \
        (local_copy / "out" / UNICODE_NAME).read_bytes()
    assert digests(client_root) == digests(local_copy)
