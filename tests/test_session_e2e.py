"""End to end: long-lived sessions (`mount`, `exec --session`, `shell`, `status`, `unmount`).

Each test mounts a client root on the test host with the real CLI (`mount --detach`,
or `mount` in the foreground), runs commands through the session's control socket, and
checks outcomes: bytes on the client, exit statuses, what the remote sees after local
edits, that one ssh connection served everything, and that nothing is left behind
(`no_leftovers`). The runtime dir (sockets, logs) is private to each test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_util import (
    CLI,
    STANDINS_DIR,
    ExecProcess,
    children,
    client_env,
    cmdline,
    descendants,
    describe,
    pid_alive,
    proc_stat,
    remote_home,
    wait_until,
)
from test_exec_e2e import no_leftovers  # noqa: F401  (autouse: no mount, session dir or temp left)

pytestmark = [pytest.mark.e2e, pytest.mark.both_os_calls]


class MountedSession:
    """A `topyaz-mount mount --detach` session, ended by unmount (or by pid) at close."""

    def __init__(self, testhost, root: Path, runtime: Path, name: str) -> None:
        self.testhost = testhost
        self.root = root
        self.runtime = runtime
        self.name = name
        self.env = {**client_env(), "TOPYAZ_MOUNT_RUNTIME_DIR": str(runtime)}
        self.pid = 0
        self.ssh: dict[int, str] = {}

    def mount_argv(self, *extra: str) -> list[str]:
        return [*CLI, "mount", "--remote", self.testhost.remote, "-F",
                str(self.testhost.ssh_config), "--remote-python", self.testhost.remote_python,
                "--root", str(self.root), "--name", self.name, *extra]

    def start(self) -> MountedSession:
        r = subprocess.run(self.mount_argv("--detach"), env=self.env, cwd=self.root,
                           capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, describe(r)
        assert f"session {self.name}: ".encode() in r.stdout, describe(r)
        self.pid = self.status()["pid"]
        self.remember_ssh()
        return self

    def remember_ssh(self) -> None:
        for child in children(self.pid):
            st = proc_stat(child)
            if st is not None and st[3] == "ssh":
                self.ssh[child] = "ssh"

    def cli(self, *args, cwd: Path | None = None, stdin: bytes | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *map(str, args)], env=self.env, cwd=cwd or self.root,
                              input=stdin if stdin is not None else b"",
                              capture_output=True, timeout=timeout)

    def exec(self, *command, cwd: Path | None = None, timeout: float = 60):
        return self.cli("exec", "--session", self.name, "--", *command, cwd=cwd,
                        timeout=timeout)

    def start_exec(self, *command) -> ExecProcess:
        argv = [*CLI, "exec", "--session", self.name, "--", *map(str, command)]
        return ExecProcess(argv, cwd=self.root, env=self.env)

    def status(self) -> dict:
        r = self.cli("status", "--json", self.name)
        assert r.returncode == 0, describe(r)
        (info,) = json.loads(r.stdout)
        return info

    def unmount(self, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cli("unmount", self.name, *extra, timeout=timeout)

    def alive(self) -> bool:
        return self.pid > 0 and pid_alive(self.pid)

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.unmount("--force", timeout=60)
        if self.alive() and wait_until(lambda: not self.alive(), 10) is False:
            os.kill(self.pid, signal.SIGKILL)
        for pid in self.ssh:
            if pid_alive(pid) and cmdline(pid)[:1] == ["ssh"]:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runtime(tmp_path) -> Path:
    return tmp_path / "runtime"


@pytest.fixture
def session(testhost, client_root, runtime):
    s = MountedSession(testhost, client_root, runtime, "work")
    try:
        yield s.start()
    finally:
        s.close()


def standin(name: str) -> list[str]:
    return [sys.executable, str(STANDINS_DIR / name)]


def our_agents(testhost) -> set[int]:
    """Agent processes under this test host's sshd."""
    return {
        pid for pid in descendants(testhost.pid)
        if any("topyaz_mount.agent" in a for a in cmdline(pid))
        and proc_stat(pid) is not None and proc_stat(pid)[2] != "Z"
    }


# --------------------------------------------------------------------------- many commands


def test_three_commands_through_one_connection_one_in_parallel(testhost, session, tmp_path):
    root = session.root
    agents = our_agents(testhost)
    # The relay ssh started and the session host (detachable by default: agent/relay.py)
    assert len(agents) == 2, agents
    slow = session.start_exec(
        "sh", "-c", "echo started; for i in $(seq 1 15); do echo line $i >> slow.txt; "
        "sleep 0.1; done; echo slow done")
    try:
        assert slow.wait_for_stdout(b"started", 30), slow.stderr
        r1 = session.exec("tpai", "--cli", "gradient.png", "-o", "out")
        assert r1.returncode == 0, describe(r1)
        r2 = session.exec("gigapixel", "--cli", "-i", "noise.jpg", "-o", "out", "--scale", "2")
        assert r2.returncode == 0, describe(r2)
        done = slow.wait(60)
    finally:
        slow.close()
    assert done.returncode == 0, describe(done)
    assert done.stdout == b"started\nslow done\n"
    assert (root / "slow.txt").read_text() == "".join(f"line {i}\n" for i in range(1, 16))

    local = tmp_path / "local"
    local.mkdir()
    for name in ("gradient.png", "noise.jpg"):
        shutil.copy2(root / name, local / name)
    subprocess.run([*standin("tpai"), "--cli", "gradient.png", "-o", "out"], cwd=local,
                   check=True, capture_output=True)
    subprocess.run([*standin("gigapixel"), "--cli", "-i", "noise.jpg", "-o", "out",
                    "--scale", "2"], cwd=local, check=True, capture_output=True)
    for out in (local / "out").iterdir():
        assert (root / "out" / out.name).read_bytes() == out.read_bytes(), out.name

    # Everything went through the one ssh connection and agent the session opened.
    assert our_agents(testhost) == agents
    ssh = [c for c in children(session.pid) if cmdline(c)[:1] == ["ssh"]]
    assert len(ssh) == 1, ssh
    info = session.status()
    assert info["agent_pid"] in agents
    assert info["running"] == 0 and info["pending_outputs"] == 0
    assert info["files_committed"] >= 3

    r = session.unmount()
    assert r.returncode == 0, describe(r)
    assert b"session work unmounted" in r.stderr
    assert wait_until(lambda: not session.alive(), 10)
    assert not (session.runtime / "work.sock").exists()


def test_exec_session_passes_status_stdio_and_stdin(session):
    r = session.exec("sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n"), describe(r)
    r = session.cli("exec", "--session", "work", "--stdin", "--", "tr", "a-z", "A-Z",
                    stdin=b"through the session\n")
    assert (r.returncode, r.stdout) == (0, b"THROUGH THE SESSION\n"), describe(r)
    r = session.exec("no-such-command-here")
    assert r.returncode == 127, describe(r)


def test_product_shortcut_through_a_session(session):
    r = session.cli("exec", "--session", "work", "photo", "gradient.png", "-o", "shortcut.png")
    assert r.returncode == 0, describe(r)
    assert (session.root / "shortcut.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_exec_client_hangs_up_its_job_and_the_session_goes_on(session):
    p = session.start_exec("sh", "-c", "trap 'echo hup > hup.txt; exit 1' HUP; echo ready; "
                           "while :; do sleep 0.1; done")
    try:
        assert p.wait_for_stdout(b"ready", 30), p.stderr
        p.proc.kill()
        p.proc.wait(10)
    finally:
        p.close()
    assert wait_until(lambda: (session.root / "hup.txt").exists(), 30)
    assert wait_until(lambda: session.status()["running"] == 0, 30)
    assert session.exec("true").returncode == 0


def test_ctrl_c_reaches_a_job_run_through_a_session(session):
    p = session.start_exec("sh", "-c", "trap 'echo got INT; exit 42' INT; echo ready; "
                           "while :; do sleep 0.1; done")
    try:
        assert p.wait_for_stdout(b"ready", 30), p.stderr
        p.send_signal(signal.SIGINT)
        r = p.wait(30)
    finally:
        p.close()
    assert r.returncode == 42, describe(r)
    assert r.stdout == b"ready\ngot INT\n"
    assert session.status()["running"] == 0


def test_exec_session_errors_are_one_line(session, tmp_path):
    r = session.cli("exec", "--session", "nosuch", "--", "true")
    assert r.returncode == 2, describe(r)
    assert r.stderr.decode().strip() == \
        "topyaz-mount: no session named nosuch (see: topyaz-mount status)"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    r = session.exec("ls", cwd=outside)
    assert r.returncode == 2, describe(r)
    assert b"outside" in r.stderr and b"Traceback" not in r.stderr, describe(r)
    r = session.exec("cat", "/etc/hostname-outside-the-root")
    assert r.returncode == 2, describe(r)


# --------------------------------------------------------------------------- local changes


def _remote_sees(session, script: str, expect: bytes, timeout: float = 10) -> bool:
    last = [b""]

    def check() -> bool:
        r = session.exec("sh", "-c", script)
        last[0] = r.stdout
        return r.stdout == expect

    ok = wait_until(check, timeout, interval=0.2)
    if not ok:
        print(f"remote last saw {last[0]!r}")
    return ok


def test_local_edits_deletes_and_new_files_are_seen_remotely(session):
    root = session.root
    (root / "input.txt").write_bytes(b"version one\n")
    (root / "doomed.txt").write_bytes(b"bye\n")
    assert _remote_sees(session, "cat input.txt; ls", b"version one\n" + b"\n".join(
        sorted(p.name.encode() for p in root.iterdir())) + b"\n")
    r = session.exec("cat", "input.txt", "doomed.txt")
    assert r.stdout == b"version one\nbye\n", describe(r)

    # Same size, new bytes: only an invalidation (not a size change) can reveal it.
    (root / "input.txt").write_bytes(b"version two\n")
    assert _remote_sees(session, "cat input.txt", b"version two\n")
    (root / "doomed.txt").unlink()
    assert _remote_sees(session, "test -e doomed.txt && echo there || echo gone", b"gone\n")
    (root / "newdir").mkdir()
    (root / "newdir" / "fresh.txt").write_bytes(b"fresh\n")
    assert _remote_sees(session, "ls newdir; cat newdir/fresh.txt", b"fresh.txt\nfresh\n")
    os.rename(root / "input.txt", root / "renamed.txt")
    assert _remote_sees(session, "ls input.txt renamed.txt 2>/dev/null", b"renamed.txt\n")
    assert session.status()["invalidated_paths"] >= 4


def test_a_running_remote_reader_sees_a_local_edit(session):
    """The kernel's caches on the remote are dropped, not just the agent's."""
    root = session.root
    (root / "f.txt").write_bytes(b"AAAA\n")
    # Long enough for the remote kernel to hold f.txt's pages and attributes (30 s in a
    # watched session), then wait for the edit to show.
    script = ("cat f.txt; echo ---; i=0; while [ \"$(cat f.txt)\" = AAAA ] && [ $i -lt 200 ];"
              " do sleep 0.05; i=$((i+1)); done; cat f.txt")
    p = session.start_exec("sh", "-c", script)
    try:
        assert p.wait_for_stdout(b"---\n", 30), p.stderr
        (root / "f.txt").write_bytes(b"BBBB\n")
        r = p.wait(60)
    finally:
        p.close()
    assert r.returncode == 0, describe(r)
    assert r.stdout == b"AAAA\n---\nBBBB\n", describe(r)


def _spool_fds(agent: int) -> list[str]:
    fd_dir = Path(f"/proc/{agent}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            targets.append(os.readlink(fd))
    return [t for t in targets if "/spool/" in t]


def test_committed_outputs_do_not_pile_up_on_the_remote(session):
    """A long session lets go of each output once it is home and closed."""
    agent = session.status()["agent_pid"]
    r = session.exec("sh", "-c", "mkdir -p many; for i in $(seq 1 30); do "
                     "head -c 100000 /dev/urandom > many/f$i.bin; done; cat many/f7.bin | wc -c")
    assert (r.returncode, r.stdout.strip()) == (0, b"100000"), describe(r)
    assert len(list((session.root / "many").iterdir())) == 30
    assert wait_until(lambda: _spool_fds(agent) == [], 10), _spool_fds(agent)
    # Read back through the mount (now from the client or the store), and append.
    r = session.exec("sh", "-c", "cat many/f3.bin | wc -c; echo more >> many/f3.bin")
    assert (r.returncode, r.stdout) == (0, b"100000\n"), describe(r)
    assert (session.root / "many" / "f3.bin").stat().st_size == 100005
    assert wait_until(lambda: _spool_fds(agent) == [], 10), _spool_fds(agent)


def test_remote_outputs_are_not_echoed_back_as_changes(session):
    r = session.exec("sh", "-c", "for i in 1 2 3; do echo $i > out$i.txt; done; mkdir d; "
                     "echo x > d/y; mv out3.txt moved.txt; rm out2.txt")
    assert r.returncode == 0, describe(r)
    assert (session.root / "out1.txt").read_text() == "1\n"
    assert (session.root / "moved.txt").read_text() == "3\n"
    assert not (session.root / "out2.txt").exists()
    time.sleep(1.0)  # give the watcher time to report what it saw
    assert session.status()["invalidated_paths"] == 0


# --------------------------------------------------------------------------- shell


def test_shell_reads_and_writes_through_the_mount(session):
    root = session.root
    (root / "sub").mkdir()
    (root / "sub" / "note.txt").write_text("written locally\n")
    script = b"pwd\ncat note.txt\necho from the remote shell > made.txt\nexit 5\n"
    r = session.cli("shell", "--session", "work", cwd=root / "sub", stdin=script)
    assert r.returncode == 5, describe(r)
    assert b"written locally" in r.stdout, describe(r)
    assert re.search(rb"sessions/[0-9a-f]+/root/sub\r?\n", r.stdout), describe(r)
    assert (root / "sub" / "made.txt").read_text() == "from the remote shell\n"


def test_shell_with_a_command_gets_a_terminal(session):
    r = session.cli("shell", "--session", "work", "--", "sh", "-c", "test -t 0 && tty; exit 3")
    assert r.returncode == 3, describe(r)
    assert b"/dev/pts/" in r.stdout, describe(r)


# --------------------------------------------------------------------------- ending


def test_unmount_waits_for_an_output_still_being_written(session):
    writer = session.start_exec(
        "sh", "-c", "exec 3>growing.txt; echo started; for i in $(seq 1 20); do "
        "echo chunk $i >&3; sleep 0.1; done")
    try:
        assert writer.wait_for_stdout(b"started", 30), writer.stderr
        r = session.unmount()
        w = writer.wait(60)
    finally:
        writer.close()
    assert r.returncode == 0, describe(r)
    assert b"waiting for 1 running command" in r.stderr, describe(r)
    assert w.returncode == 0, describe(w)
    assert (session.root / "growing.txt").read_text() == "".join(
        f"chunk {i}\n" for i in range(1, 21))
    assert wait_until(lambda: not session.alive(), 10)


def test_forced_unmount_drops_pending_outputs_and_says_how_much(session):
    writer = session.start_exec(
        "sh", "-c", "exec 3>held.bin; head -c 1048576 /dev/zero >&3; echo ready; sleep 60")
    try:
        assert writer.wait_for_stdout(b"ready", 30), writer.stderr
        r = session.unmount("--force")
        w = writer.wait(60)
    finally:
        writer.close()
    assert r.returncode == 0, describe(r)
    line = re.search(rb"dropped 1 output\(s\), 1\.0 MiB, not committed; kept on the remote "
                     rb"host at (\S+)", r.stderr)
    assert line, describe(r)
    assert w.returncode in (143, 255), describe(w)  # killed (SIGTERM), or cut off
    assert b"unmounted with --force" in w.stderr, describe(w)
    assert not (session.root / "held.bin").exists()
    kept = Path(line.group(1).decode())
    assert kept.is_relative_to(remote_home())
    assert (kept / "files" / "held.bin").stat().st_size == 1 << 20
    manifest = json.loads((kept / "manifest.json").read_text())
    assert [(f["path"], f["complete"]) for f in manifest["files"]] == [("held.bin", False)]
    shutil.rmtree(kept)


def test_ctrl_c_on_a_foreground_mount_unmounts_cleanly(testhost, client_root, runtime):
    s = MountedSession(testhost, client_root, runtime, "fg")
    mount = ExecProcess(s.mount_argv(), cwd=client_root, env=s.env)
    try:
        assert mount.wait_for_stdout(b"mounted at", 60), mount.stderr
        s.pid = mount.pid
        s.remember_ssh()
        r = s.exec("sh", "-c", "echo made in the foreground session > fg.txt")
        assert r.returncode == 0, describe(r)
        mount.send_signal(signal.SIGINT)
        done = mount.wait(60)
    finally:
        mount.close()
        s.close()
    assert done.returncode == 0, describe(done)
    assert b"session fg unmounted" in done.stderr, describe(done)
    assert (client_root / "fg.txt").read_text() == "made in the foreground session\n"
    assert not (runtime / "fg.sock").exists()


def test_lost_connection_ends_the_session_clearly(testhost, client_root, runtime):
    # A session that ends with its agent (a detachable one: test_reconnect_e2e).
    session = MountedSession(testhost, client_root, runtime, "work")
    session.env["TOPYAZ_MOUNT_GRACE"] = "0"
    try:
        session.start()
        agent = session.status()["agent_pid"]
        os.kill(agent, signal.SIGKILL)
        assert wait_until(lambda: not session.alive(), 30)
        log = (session.runtime / "work.log").read_text()
        assert "the agent on" in log and "died (killed)" in log, log
        assert "nothing is kept there" in log and "session work ended" in log, log
        assert not (session.runtime / "work.sock").exists()
        r = session.exec("true")
        assert r.returncode == 2 and b"no session named work" in r.stderr, describe(r)
    finally:
        session.close()
    # The next agent on the host clears what the killed one left.
    other = MountedSession(testhost, session.root, session.runtime, "after")
    try:
        other.start()
        assert other.exec("true").returncode == 0
    finally:
        other.close()


# --------------------------------------------------------------------------- two sessions


def test_two_sessions_on_two_roots_are_isolated(testhost, tmp_path, runtime):
    roots = {}
    for name in ("left", "right"):
        root = tmp_path / name
        root.mkdir(mode=0o700)
        (root / f"only-{name}.txt").write_text(f"{name}\n")
        roots[name] = root
    left = MountedSession(testhost, roots["left"], runtime, "left")
    right = MountedSession(testhost, roots["right"], runtime, "right")
    try:
        left.start()
        right.start()
        r = left.exec("ls", "-a")
        assert r.stdout == b".\n..\nonly-left.txt\n", describe(r)
        r = right.exec("ls", "-a")
        assert r.stdout == b".\n..\nonly-right.txt\n", describe(r)
        r = left.exec("sh", "-c", "echo from left > made.txt")
        assert r.returncode == 0, describe(r)
        assert (roots["left"] / "made.txt").exists()
        assert not (roots["right"] / "made.txt").exists()
        # A command started in the other session's root is refused, not translated.
        r = left.exec("true", cwd=roots["right"])
        assert r.returncode == 2, describe(r)
        infos = json.loads(left.cli("status", "--json").stdout)
        assert sorted(i["name"] for i in infos) == ["left", "right"]
        assert len({i["mountpoint"] for i in infos}) == 2
        assert left.status()["mountpoint"] != right.status()["mountpoint"]
        assert left.unmount().returncode == 0
        assert right.exec("cat", "only-right.txt").stdout == b"right\n"
    finally:
        left.close()
        right.close()


def test_mount_refuses_a_name_in_use(session):
    r = subprocess.run(session.mount_argv("--detach"), env=session.env, cwd=session.root,
                       capture_output=True, timeout=60)
    assert r.returncode == 2, describe(r)
    assert b"a session named work is running already" in r.stderr, describe(r)
