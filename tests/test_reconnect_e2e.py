"""A running job outlives a lost connection and the client resumes (issue 14), on the
real test host (sshd, FUSE), with a detachable session (``--grace``).

The job prints a numbered line a second (stdout and stderr), reads an input and writes
an output in the middle, and exits 7. The link goes away under it: the client's ssh is
killed by pid, or the emulated link (tools/wanproxy.py) is torn down for a while and
brought back on the same port. Each case checks the exit status, every line of stdout
and stderr exactly once and in order, the input's hash as the job read it, the
output's bytes, and that nothing was committed twice (no conflict copy, no temporary).

Short keepalives (``TOPYAZ_MOUNT_KEEPALIVE=1,4``) keep the cases quick.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest
from bench_wan import start_proxy, stop_proxy
from e2e_util import (
    CLI,
    ExecProcess,
    client_env,
    describe,
    exec_argv,
    remote_home,
    session_agent_pid,
    session_dirs,
    temp_files,
    wait_until,
)
from test_exec_e2e import no_leftovers  # noqa: F401  (autouse: no mount, session dir or temp left)

KEEPALIVE = "1,4"
LINES = 14
READ_AT = 6

JOB = """
import hashlib, os, random, sys, time
os.makedirs("out", exist_ok=True)
for i in range(int(sys.argv[1])):
    print(f"line {i:03d} " + "x" * 300, flush=True)
    print(f"err {i:03d}", file=sys.stderr, flush=True)
    if i == int(sys.argv[2]):
        with open("in.bin", "rb") as f:
            print("input", hashlib.sha256(f.read()).hexdigest(), flush=True)
    if i == int(sys.argv[3]):
        with open("out/result.bin", "wb") as f:
            f.write(random.Random(3).randbytes(3 << 20))
    time.sleep(1)
sys.exit(7)
"""


def _expected_stdout(input_hash: str) -> bytes:
    lines = []
    for i in range(LINES):
        lines.append(f"line {i:03d} " + "x" * 300)
        if i == READ_AT:
            lines.append(f"input {input_hash}")
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def job_root(client_root):
    data = random.Random(11).randbytes(1 << 20)
    (client_root / "in.bin").write_bytes(data)
    return client_root, hashlib.sha256(data).hexdigest()


def _start(
    testhost, root, remote=None, grace: str = "60", write_at: int = READ_AT, runtime=None,
    backend: str = "auto",
) -> ExecProcess:
    env = client_env()
    env["TOPYAZ_MOUNT_KEEPALIVE"] = KEEPALIVE
    if runtime is not None:
        env["TOPYAZ_MOUNT_RUNTIME_DIR"] = str(runtime)
    argv = exec_argv(
        testhost,
        root,
        ["python3", "-c", JOB, str(LINES), str(READ_AT), str(write_at)],
        # The stage backend copies over only the inputs it is told of.
        options=["--grace", grace, "--backend", backend]
        + (["--include", "in.bin"] if backend == "stage" else []),
        remote=remote,
    )
    return ExecProcess(argv, cwd=root, env=env)


def _check(r: subprocess.CompletedProcess, root, input_hash: str, outages: int) -> None:
    err = r.stderr.decode()
    assert r.returncode == 7, describe(r)
    assert r.stdout == _expected_stdout(input_hash), describe(r)
    assert re.findall(r"err \d+", err) == [f"err {i:03d}" for i in range(LINES)], err
    assert len(re.findall(r"link lost at \d\d:\d\d:\d\d, reconnected after \d+ s", err)) == (
        outages
    ), err
    assert "Traceback" not in err
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == ["result.bin"]  # no conflict copy
    assert (out / "result.bin").read_bytes() == random.Random(3).randbytes(3 << 20)
    assert temp_files(root) == []


def test_ssh_killed_twice_job_goes_on(testhost, job_root):
    root, input_hash = job_root
    with _start(testhost, root) as p:
        killed: set[int] = set()
        for outage, needle in enumerate((b"line 002", b"line 006"), 1):
            assert p.wait_for_stdout(needle, 60), p.stderr
            assert wait_until(lambda: set(p.remember_ssh()) - killed, 10), "no ssh child"
            for pid in set(p.remember_ssh()) - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            assert wait_until(lambda n=outage: p.stderr.count(b"reconnected after") == n, 30), (
                p.stderr
            )
        r = p.wait(60)
    _check(r, root, input_hash, outages=2)


# --------------------------------------------------------------------------- link cuts


def _start_proxy(target_port: int, listen_port: int, log) -> tuple[subprocess.Popen, int]:
    """The emulated link (10 ms, 80 Mbit/s) on ``listen_port`` (0: any)."""
    return start_proxy(target_port, 10, 80, log, listen_port)


def _stop(p: subprocess.Popen) -> None:
    """Tear the link down: every connection through it ends at once."""
    if p.poll() is None:
        p.kill()
        p.wait()
    stop_proxy(p)


@pytest.mark.parametrize("outage,backend", [(3, "auto"), (30, "auto"), (3, "stage")])
def test_link_cut_then_back(testhost, job_root, tmp_path, outage, backend):
    """The link is torn down for ``outage`` seconds while the job runs and reads an
    input; it comes back on the same port and the job's data flows again. With the
    stage backend too (the input was copied over before the job; the output goes home
    once the link is back)."""
    root, input_hash = job_root
    proxy, port = _start_proxy(testhost.port, 0, tmp_path / "wanproxy.log")
    try:
        remote = f"{testhost.remote_user}@127.0.0.1:{port}"
        with _start(testhost, root, remote, backend=backend) as p:
            assert p.wait_for_stdout(b"line 003", 60), p.stderr
            _stop(proxy)
            cut = time.monotonic()
            if outage > 10:  # the host lists the session as waiting for its client
                assert wait_until(lambda: _detached(testhost, str(root)), 8)
                _attach_refused_without_the_secret(testhost, _detached(testhost, str(root)))
            time.sleep(max(0.0, outage - (time.monotonic() - cut)))
            proxy, _ = _start_proxy(testhost.port, port, tmp_path / "wanproxy.log")
            r = p.wait(outage + 90)
    finally:
        _stop(proxy)
    _check(r, root, input_hash, outages=1)


def test_ctrl_c_during_an_outage_reaches_the_job(testhost, job_root, tmp_path):
    """Ctrl-C typed while the link is down waits in the stream and stops the job once
    the link is back; its status (130) and every line it printed arrive once."""
    root, input_hash = job_root
    proxy, port = _start_proxy(testhost.port, 0, tmp_path / "wanproxy.log")
    try:
        with _start(testhost, root, f"{testhost.remote_user}@127.0.0.1:{port}") as p:
            assert p.wait_for_stdout(b"line 002", 60), p.stderr
            _stop(proxy)
            time.sleep(1)
            p.send_signal(signal.SIGINT)
            time.sleep(2)
            proxy, _ = _start_proxy(testhost.port, port, tmp_path / "wanproxy.log")
            r = p.wait(60)
    finally:
        _stop(proxy)
    err = r.stderr.decode()
    assert r.returncode == 130, describe(r)
    assert "stopping the remote command" in err and "reconnected after" in err, err
    expected = _expected_stdout(input_hash)
    assert r.stdout and expected.startswith(r.stdout) and r.stdout.endswith(b"\n"), describe(r)
    assert f"line {LINES - 1:03d}".encode() not in r.stdout  # stopped, not run to its end


def test_link_stalled_then_back(testhost, job_root, tmp_path):
    """The link passes no packet for 7 s (the proxy stopped, its connections open):
    both ends take the silence for a dead link, and the client's new ssh gets through
    once the link moves again. The issue's 75 s stall against the default 45 s
    dead-link timeout, scaled to this test's 4 s (``KEEPALIVE``): 75 * 4 / 45 = 6.7 s."""
    root, input_hash = job_root
    proxy, port = _start_proxy(testhost.port, 0, tmp_path / "wanproxy.log")
    try:
        with _start(testhost, root, f"{testhost.remote_user}@127.0.0.1:{port}") as p:
            assert p.wait_for_stdout(b"line 003", 60), p.stderr
            os.kill(proxy.pid, signal.SIGSTOP)
            try:
                time.sleep(7)
            finally:
                os.kill(proxy.pid, signal.SIGCONT)
            r = p.wait(120)
    finally:
        _stop(proxy)
    _check(r, root, input_hash, outages=1)


def test_past_the_grace_the_session_ends_and_keeps_outputs(testhost, job_root, tmp_path):
    """No reconnect within the grace: the remote ends the job and tears the session
    down as on a lost link today, keeping the output whose commit could not finish
    (complete, its bytes); the client says it gave up."""
    root, _ = job_root
    before = session_dirs()
    proxy, port = _start_proxy(testhost.port, 0, tmp_path / "wanproxy.log")
    remote = f"{testhost.remote_user}@127.0.0.1:{port}"
    session_id = None
    try:
        with _start(testhost, root, remote, grace="5", write_at=2) as p:
            assert p.wait_for_stdout(b"line 001", 60), p.stderr
            new = session_dirs() - before
            assert len(new) == 1
            session = new.pop()
            session_id = os.path.basename(session)
            host = session_agent_pid(session)
            os.kill(p.pid, signal.SIGSTOP)  # the output's commit cannot finish now
            try:
                time.sleep(3)  # the job writes out/result.bin meanwhile
                _stop(proxy)
            finally:
                os.kill(p.pid, signal.SIGCONT)
            r = p.wait(60)
            assert wait_until(lambda: not os.path.exists(session), 30), "no teardown"
            assert host is not None and wait_until(lambda: not _alive(host), 10)
        err = r.stderr.decode()
        assert r.returncode == 255, describe(r)
        assert "giving up" in err and "lost during the job" in err, err
        assert "Traceback" not in err
        kept = _kept_dir() / session_id
        manifest = json.loads((kept / "manifest.json").read_text())
        (entry,) = manifest["files"]
        assert entry["path"] == "out/result.bin" and entry["complete"] is True
        data = (kept / "files" / "out" / "result.bin").read_bytes()
        assert data == random.Random(3).randbytes(3 << 20)
        assert not (root / "out" / "result.bin").exists()
        assert temp_files(root) == []
    finally:
        _stop(proxy)
        if session_id:
            shutil.rmtree(_kept_dir() / session_id, ignore_errors=True)


def _kept_dir():
    return remote_home() / ".cache" / "topyaz-mount" / "kept"


def _detached(testhost, root: str) -> str:
    """The session of ``root`` that ``status --remote HOST`` lists as detached, or ""."""
    argv = [*CLI, "status", "--remote", testhost.remote, "-F", str(testhost.ssh_config),
            "--remote-python", testhost.remote_python, "--json"]
    r = subprocess.run(argv, env=client_env(), capture_output=True, timeout=60)
    assert r.returncode == 0, describe(r)
    found = [s for s in json.loads(r.stdout) if s["root"] == root and s["detached_since"]]
    return found[0]["session"] if found else ""


def _attach_refused_without_the_secret(testhost, session: str) -> None:
    """An attach with the right session id and another secret is refused."""
    agent = f"exec {testhost.remote_python} -m topyaz_mount.agent --attach {session}"
    argv = ["ssh", "-F", str(testhost.ssh_config), "-p", str(testhost.port),
            f"{testhost.remote_user}@127.0.0.1", agent]
    line = f"TMRESUME 1 {session} {'0' * 32}\n".encode()
    r = subprocess.run(argv, input=line, capture_output=True, timeout=60)
    assert r.stdout == b"TMRESUME NO not this session's id and secret\n", describe(r)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_mount_session_reconnects_and_its_job_goes_on(testhost, job_root, tmp_path):
    """The long-lived `mount` (detached): its ssh is killed while a command runs
    through it; the session reconnects, the command ends as if nothing happened."""
    from test_session_e2e import MountedSession

    root, input_hash = job_root
    s = MountedSession(testhost, root, tmp_path / "runtime", "graced")
    s.env.update(TOPYAZ_MOUNT_KEEPALIVE=KEEPALIVE, TOPYAZ_MOUNT_GRACE="60")
    try:
        s.start()
        with s.start_exec("python3", "-c", JOB, str(LINES), str(READ_AT), str(READ_AT)) as p:
            assert p.wait_for_stdout(b"line 002", 60), p.stderr
            for pid in list(s.ssh):
                os.kill(pid, signal.SIGKILL)
            r = p.wait(90)
        log = (s.runtime / "graced.log").read_text()
        assert "reconnected after" in log, log
        _check(r, root, input_hash, outages=0)
        s.remember_ssh()
        assert s.unmount().returncode == 0
    finally:
        s.close()


# --------------------------------------------------------------------------- attach


def _attach(testhost, session: str, env, remote=None) -> subprocess.CompletedProcess:
    argv = [*CLI, "attach", "--remote", remote or testhost.remote,
            "-F", str(testhost.ssh_config), "--remote-python", testhost.remote_python, session]
    return subprocess.run(argv, env=env, capture_output=True, timeout=120)


def test_client_killed_then_attach_from_a_new_process(testhost, job_root, tmp_path):
    """The exec client itself is killed (-9) mid-job; `attach` from a new process gets
    the rest of stdout and stderr (nothing twice), the exit status, and the output,
    committed once; the job reads its input and writes its output while no client is
    there. An attach while the client lives is refused; one after the session ended
    names the session unknown (its record went with it)."""
    root, input_hash = job_root
    runtime = tmp_path / "rt"
    with _start(testhost, root, write_at=READ_AT + 1, runtime=runtime) as p:
        assert p.wait_for_stdout(b"line 002", 60), p.stderr
        started = time.monotonic()
        records = list((runtime / "detached").glob("*.json"))
        assert len(records) == 1 and records[0].stat().st_mode & 0o777 == 0o600
        session = records[0].stem
        env = {**client_env(), "TOPYAZ_MOUNT_RUNTIME_DIR": str(runtime)}
        live = _attach(testhost, session, env)
        assert live.returncode == 2, describe(live)
        assert f"session {session} is attached to a live client" in live.stderr.decode()
        # Just after a line: a client killed between writing a piece out and recording
        # it would print that piece again (detached.py).
        assert p.wait_for_stdout(f"line {p.stdout.count(b'line '):03d}".encode(), 10)
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGKILL)
        p.proc.wait(10)
        assert wait_until(lambda: _detached(testhost, str(root)) == session, 15)
        # The job reads its input (line 6) and writes its output (line 7) meanwhile.
        time.sleep(max(0.0, started + READ_AT - time.monotonic()))
        r = _attach(testhost, session, env)
        before_out, before_err = p.stdout, p.stderr
    err = before_err.decode() + r.stderr.decode()
    assert r.returncode == 7, describe(r)
    assert before_out + r.stdout == _expected_stdout(input_hash), (before_out, describe(r))
    assert re.findall(r"err \d+", err) == [f"err {i:03d}" for i in range(LINES)], err
    assert "Traceback" not in err
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == ["result.bin"]  # no conflict copy
    assert (out / "result.bin").read_bytes() == random.Random(3).randbytes(3 << 20)
    assert temp_files(root) == []
    assert not list((runtime / "detached").glob("*.json"))  # the record went with it
    again = _attach(testhost, session, env)
    assert again.returncode != 0 and f"unknown session {session}" in again.stderr.decode()
    # A record whose session is no longer on the host: ended (and the record goes).
    record = runtime / "detached" / f"{session}.json"
    record.write_text(json.dumps({"session": session, "secret": "0" * 32,
                                  "remote": testhost.remote, "root": str(root),
                                  "protect": [], "hide": [], "read_only": False}))
    ended = _attach(testhost, session, env)
    assert ended.returncode == 255, describe(ended)
    assert ended.stderr.decode() == (
        f"topyaz-mount: session {session} has ended on {testhost.remote}\n"
    ), describe(ended)
    assert not record.exists()
