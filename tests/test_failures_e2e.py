"""Expected failures, designed for: a killed agent, a full client disk (real sshd, FUSE).

Each ends with a clear message and a non-zero status, never a half-written output, and
nothing left behind once the next session has started (it collects dead sessions).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest
from e2e_util import (
    cmdline,
    descendants,
    describe,
    pid_alive,
    run_exec,
    session_dirs,
    start_exec,
    temp_files,
    wait_until,
)
from test_exec_e2e import no_leftovers  # noqa: F401  (autouse: no mount, session dir or temp left)

MiB = 1 << 20

JOB = "import os, time; os.write(1, b'ready\\n'); time.sleep(120)"


def _agents(testhost) -> list[int]:
    return [p for p in descendants(testhost.pid) if "topyaz_mount.agent" in " ".join(cmdline(p))]


def test_killed_agent(testhost, client_root):
    before = set(_agents(testhost))
    # A session that ends with its agent (a detachable one's host: test_reconnect_e2e).
    with start_exec(testhost, client_root, "python3", "-c", JOB, options=["--grace", "0"]) as p:
        assert p.wait_for_stdout(b"ready", 30), p.stderr
        agents = [a for a in _agents(testhost) if a not in before]
        assert len(agents) == 1
        job = [d for d in descendants(agents[0]) if "time.sleep(120)" in " ".join(cmdline(d))]
        assert job, "the job process was not found"
        sessions = session_dirs()
        os.kill(agents[0], signal.SIGKILL)
        r = p.wait(30)
    assert r.returncode == 255, describe(r)
    lines = r.stderr.decode().strip().splitlines()
    assert "lost" in lines[-1] and "Traceback" not in r.stderr.decode(), describe(r)
    # the next session collects the dead one: its directory, and the command it left
    r2 = run_exec(testhost, client_root, "true")
    assert r2.returncode == 0, describe(r2)
    assert wait_until(lambda: not (sessions & session_dirs()), 10), sessions & session_dirs()
    assert wait_until(lambda: not any(pid_alive(j) for j in job), 10)
    assert temp_files(client_root) == []


@pytest.fixture
def small_disk(client_root):
    """A 4 MiB tmpfs inside the client root, unmounted afterwards."""
    where = client_root / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_client_disk_keeps_the_output_on_the_remote(testhost, client_root, small_disk):
    script = f"head -c {8 * MiB} /dev/urandom > small/out.bin; echo done"
    r = run_exec(testhost, client_root, "sh", "-c", script)
    err = r.stderr.decode()
    assert r.returncode == 255, describe(r)
    assert b"done" in r.stdout
    assert "small/out.bin" in err and "kept on the remote host" in err, err
    assert "Traceback" not in err
    assert not (small_disk / "out.bin").exists()  # never a half-written output
    assert list(small_disk.iterdir()) == []  # and no temporary left on the full disk
    kept = err.split("kept on the remote host at ", 1)[1].split()[0]
    assert os.path.getsize(kept) == 8 * MiB  # the bytes are safe on the remote
    shutil.rmtree(kept.split("/kept/", 1)[0] + "/kept/" + kept.split("/kept/", 1)[1].split("/")[0])


def test_a_command_outlives_the_agents_idle_threads(testhost, client_root):
    """Regression: the command once ran under PR_SET_PDEATHSIG, which fires when the
    thread that forked it exits; trio's worker threads idle out after ~10 s."""
    r = run_exec(testhost, client_root, "sh", "-c", "sleep 12; echo survived", timeout=90)
    assert r.returncode == 0, describe(r)
    assert r.stdout == b"survived\n"
