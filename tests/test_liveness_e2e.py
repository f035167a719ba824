"""Liveness and clean ends (issue 11, item 5), on the real test host (sshd, FUSE).

The link is cut (the client's ssh killed by pid) or stalled (SIGSTOP) in the middle of a
job with outputs in flight; the agent is killed. Each case checks what the job left:
the session torn down on the remote (job group ended, mount and session dir gone), the
outputs kept with a manifest saying which are complete (bytes checked) and which are
partial, and the client's last line saying exactly what happened to them.

Short keepalives (``TOPYAZ_MOUNT_KEEPALIVE=1,5``: a ping a second, dead after 5 s of
silence) keep these quick; the defaults are 10 s and 45 s.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess

import blake3
import pytest
from e2e_util import (
    CLI,
    ExecProcess,
    client_env,
    cmdline,
    descendants,
    describe,
    exec_argv,
    pid_alive,
    portable_agent_python,
    remote_home,
    session_agent_pid,
    session_dirs,
    temp_files,
    wait_until,
)
from test_exec_e2e import no_leftovers  # noqa: F401  (autouse: no mount, session dir or temp left)

MiB = 1 << 20
KEEPALIVE = "1,5"
COMPLETE = (("done.bin", 1, 3 * MiB), ("done2.bin", 4, MiB), ("done3.bin", 5, 64 << 10))

# Writes out/done.bin, done2.bin, done3.bin (closed: complete outputs), then out/partial.bin
# (left open), says so, and sleeps with a helper in its process group. Bytes are seeded,
# so the test knows them.
JOB = """
import os, random, subprocess, sys, time
os.makedirs("out", exist_ok=True)
helper = subprocess.Popen(["sleep", "300"])
print("ready", helper.pid, flush=True)
time.sleep(float(sys.argv[1]))
with open("out/done.bin", "wb") as f:
    f.write(random.Random(1).randbytes(3 << 20))
with open("out/done2.bin", "wb") as f:
    f.write(random.Random(4).randbytes(1 << 20))
with open("out/done3.bin", "wb") as f:
    f.write(random.Random(5).randbytes(1 << 16))
time.sleep(1)  # over a live link, done.bin is home by then
f = open("out/partial.bin", "wb")
f.write(random.Random(2).randbytes(1 << 20))
f.flush()
os.fsync(f.fileno())
print("written", flush=True)
time.sleep(300)
"""


def _seeded(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _kept_dir():
    return remote_home() / ".cache" / "topyaz-mount" / "kept"


def _start(testhost, root, *command, wait_s: str = "0", keepalive: str | None = KEEPALIVE,
           remote_python: str | None = None):
    env = client_env()
    if keepalive is not None:
        env["TOPYAZ_MOUNT_KEEPALIVE"] = keepalive
    # A session that ends with its link (not the detachable default: test_reconnect_e2e).
    argv = exec_argv(testhost, root, command, options=["--grace", "0"],
                     remote_python=remote_python)
    return ExecProcess(argv, cwd=root, env=env)


def _job_processes(agent_pid: int) -> set[int]:
    return {p for p in descendants(agent_pid) if "python3" in " ".join(cmdline(p))[:40]}


class _Running:
    """The remote side of one running exec: its session dir, agent and job processes."""

    def __init__(self, before: set[str], helper_pid: int) -> None:
        new = session_dirs() - before
        assert len(new) == 1, new
        self.session = new.pop()
        self.session_id = os.path.basename(self.session)
        agent = session_agent_pid(self.session)
        assert agent is not None
        self.agent = agent
        self.job = descendants(agent)
        self.helper = helper_pid
        assert helper_pid in self.job

    def torn_down(self) -> bool:
        return (
            not os.path.exists(self.session)
            and not any(pid_alive(p) for p in self.job)
            and not any(self.session in m for m in _mounts())
        )


def _mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f]


def _helper_pid(p: ExecProcess) -> int:
    line = next(x for x in p.stdout.decode().splitlines() if x.startswith("ready"))
    return int(line.split()[1])


def _kept_manifest(session_id: str) -> dict:
    return json.loads((_kept_dir() / session_id / "manifest.json").read_text())


def _check_kept(session_id: str) -> None:
    """done*.bin are kept complete with their bytes; partial.bin is marked partial."""
    manifest = _kept_manifest(session_id)
    files = {e["path"]: e for e in manifest["files"]}
    assert set(files) == {f"out/{name}" for name, _, _ in COMPLETE} | {"out/partial.bin"}
    for name, seed, size in COMPLETE:
        entry = files[f"out/{name}"]
        expected = _seeded(seed, size)
        assert entry["complete"] is True and entry["size"] == len(expected)
        assert entry["blake3"] == blake3.blake3(expected).hexdigest()
        kept_bytes = (_kept_dir() / session_id / "files" / "out" / name).read_bytes()
        assert kept_bytes == expected
    assert files["out/partial.bin"]["complete"] is False


@pytest.fixture
def kept_cleanup():
    made: list[str] = []
    yield made
    for session_id in made:
        shutil.rmtree(_kept_dir() / session_id, ignore_errors=True)


def _cut_link_during_job(testhost, root) -> tuple[_Running, subprocess.CompletedProcess]:
    """Run JOB, stop the client so its outputs cannot be committed, kill its ssh by pid;
    returns once the agent has torn down and the client has ended."""
    before = session_dirs()
    with _start(testhost, root, "python3", "-c", JOB, "2") as p:
        assert p.wait_for_stdout(b"ready", 60), p.stderr
        remote = _Running(before, _helper_pid(p))
        ssh = p.remember_ssh()
        assert ssh, "no ssh child found"
        os.kill(p.pid, signal.SIGSTOP)  # the commits of done*.bin cannot finish now
        try:
            assert wait_until(lambda: _wrote(remote), 30), "the job did not write"
            for pid in ssh:
                os.kill(pid, signal.SIGKILL)
            assert wait_until(remote.torn_down, 30), "the agent did not tear down"
        finally:
            os.kill(p.pid, signal.SIGCONT)
        return remote, p.wait(60)


def test_link_cut_ends_the_job_and_keeps_outputs(testhost, client_root, kept_cleanup):
    """The client's ssh is killed while commits wait on the (stopped) client: the agent
    ends the job's group, keeps the outputs with a manifest, unmounts and removes its
    session dir."""
    remote, r = _cut_link_during_job(testhost, client_root)
    kept_cleanup.append(remote.session_id)
    err = r.stderr.decode()
    assert r.returncode == 255, describe(r)
    assert "lost during the job" in err and "keeps outputs not yet committed" in err, err
    assert "Traceback" not in err
    _check_kept(remote.session_id)
    assert not (client_root / "out" / "done.bin").exists()
    assert temp_files(client_root) == []


def _kept_cli(testhost, root, *args: str) -> subprocess.CompletedProcess:
    argv = [*CLI, "kept", "--remote", testhost.remote, "-F", str(testhost.ssh_config)]
    argv += ["--remote-python", testhost.remote_python, *args]
    return subprocess.run(argv, cwd=root, env=client_env(), capture_output=True, timeout=120)


def test_kept_list_recover_clear(testhost, client_root, kept_cleanup):
    remote, _ = _cut_link_during_job(testhost, client_root)
    kept_cleanup.append(remote.session_id)
    # list
    r = _kept_cli(testhost, client_root, "--json")
    assert r.returncode == 0, describe(r)
    listed = {s["session"]: s for s in json.loads(r.stdout)["sessions"]}
    mine = listed[remote.session_id]
    assert mine["root"] == str(client_root)
    states = {f["path"]: f["complete"] for f in mine["files"]}
    assert states == {f"out/{n}": True for n, _, _ in COMPLETE} | {"out/partial.bin": False}
    r = _kept_cli(testhost, client_root)
    assert r.returncode == 0 and remote.session_id.encode() in r.stdout, describe(r)
    assert b"partial" in r.stdout and b"out/done.bin" in r.stdout
    # recover: done2.bin goes home; done.bin changed locally since, so it lands beside
    # it; done3.bin is home already (as when a commit arrived but the agent never heard)
    mine_local = b"the user's own file\n"
    (client_root / "out").mkdir(exist_ok=True)
    (client_root / "out" / "done.bin").write_bytes(mine_local)
    (client_root / "out" / "done3.bin").write_bytes(_seeded(5, 64 << 10))
    r = _kept_cli(testhost, client_root, "--recover", "--root", str(client_root))
    err = r.stderr.decode()
    assert r.returncode == 0, describe(r)
    assert "recovered out/done2.bin" in err and "saved as out/done.remote-conflict.bin" in err
    assert "recovered out/done3.bin" in err, err
    assert "1 partial output(s) left" in err, err
    assert (client_root / "out" / "done2.bin").read_bytes() == _seeded(4, MiB)
    assert (client_root / "out" / "done.bin").read_bytes() == mine_local
    conflict = client_root / "out" / "done.remote-conflict.bin"
    assert conflict.read_bytes() == _seeded(1, 3 * MiB)
    assert (client_root / "out" / "done3.bin").read_bytes() == _seeded(5, 64 << 10)
    assert not (client_root / "out" / "done3.remote-conflict.bin").exists()
    assert not (client_root / "out" / "partial.bin").exists()
    assert temp_files(client_root) == []
    left = _kept_manifest(remote.session_id)["files"]
    assert [(e["path"], e["complete"]) for e in left] == [("out/partial.bin", False)]
    # clear this session
    r = _kept_cli(testhost, client_root, "--clear", "--session", remote.session_id, "--json")
    assert r.returncode == 0, describe(r)
    assert remote.session_id not in {s["session"] for s in json.loads(r.stdout)["sessions"]}
    assert not (_kept_dir() / remote.session_id).exists()


def _wrote(remote: _Running) -> bool:
    """The job has written both outputs (partial.bin holds its 1 MiB)."""
    return any(
        "partial.bin" in _readlink(f"/proc/{pid}/fd/{fd}")
        for pid in remote.job
        if pid_alive(pid)
        for fd in _fds(pid)
    )


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _fds(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []


@pytest.mark.parametrize("channel", ["fdstream", "threads"])
def test_link_stalled_both_sides_give_up(testhost, client_root, kept_cleanup, channel, tmp_path):
    """ssh and the client are stopped (no byte moves, the TCP connection stays up): the
    agent's own keepalive ends the job and the session, and the agent exits though its
    stdin never ends (with the channel moved by threads, as on Windows, too: the read
    that never returns holds nothing up); once the client runs again, its keepalive
    finds the link silent and gives up with a line that says so."""
    python = portable_agent_python(testhost, tmp_path / "host") if channel == "threads" else None
    before = session_dirs()
    with _start(testhost, client_root, "python3", "-c", JOB, "0", remote_python=python) as p:
        assert p.wait_for_stdout(b"written", 60), p.stderr
        remote = _Running(before, _helper_pid(p))
        kept_cleanup.append(remote.session_id)
        ssh = p.remember_ssh()
        assert ssh
        # done.bin was closed before "written": wait for it to be home.
        done = client_root / "out" / "done.bin"
        assert wait_until(done.exists, 30)
        for pid in ssh:
            os.kill(pid, signal.SIGSTOP)
        os.kill(p.pid, signal.SIGSTOP)
        try:
            assert wait_until(remote.torn_down, 60), "the agent did not notice the stall"
            assert wait_until(lambda: not pid_alive(remote.agent), 30), "the agent lingers"
        finally:
            os.kill(p.pid, signal.SIGCONT)
        try:
            r = p.wait(60)
        finally:
            for pid in ssh:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGCONT)
    err = r.stderr.decode()
    assert r.returncode == 255, describe(r)
    assert "no answer for" in err and "dead or stalled" in err, err
    assert done.read_bytes() == _seeded(1, 3 * MiB)
    manifest = _kept_manifest(remote.session_id)
    assert [(e["path"], e["complete"]) for e in manifest["files"]] == [("out/partial.bin", False)]
    assert manifest["root"] == str(client_root)
    assert not (client_root / "out" / "partial.bin").exists()


STREAMER = """
import os, random, sys, time
f = open("big.out", "wb")
f.write(random.Random(3).randbytes(24 << 20))
f.flush()
os.fsync(f.fileno())
print("streaming", flush=True)
time.sleep(300)
"""


def test_killed_agent_message_says_what_was_lost(testhost, client_root):
    """kill -9 of the agent while an output streams home: the client says the agent
    died and that the output on its way is lost on the remote, and claims nothing kept."""
    before = session_dirs()
    with _start(testhost, client_root, "python3", "-c", STREAMER) as p:
        assert p.wait_for_stdout(b"streaming", 60), p.stderr
        new = session_dirs() - before
        assert len(new) == 1
        session = new.pop()
        agent = session_agent_pid(session)
        assert agent is not None
        job = descendants(agent)
        assert wait_until(lambda: _upload_begun(p, client_root), 30)
        os.kill(agent, signal.SIGKILL)
        r = p.wait(60)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 255, describe(r)
    assert err and "died" in err[-1] and "killed" in err[-1], err
    assert "lost on the remote" in err[-1] and "nothing is kept there" in err[-1], err
    assert "1 output(s) were on their way: big.out" in err[-1], err
    assert not os.path.exists(_kept_dir() / os.path.basename(session))
    assert not (client_root / "big.out").exists()
    assert temp_files(client_root) == []
    # the next session collects what the killed agent left
    r2 = ExecProcess(exec_argv(testhost, client_root, ["true"]), cwd=client_root).wait(60)
    assert r2.returncode == 0, describe(r2)
    assert wait_until(lambda: not os.path.exists(session), 10)
    assert wait_until(lambda: not any(pid_alive(j) for j in job), 10)


def _upload_begun(p: ExecProcess, root) -> bool:
    """The client holds a commit's temporary file open (an upload is under way)."""
    for fd in _fds(p.pid):
        try:
            target = os.readlink(f"/proc/{p.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)) and ("/#" in target or ".tmcommit-" in target):
            return True
    return False
