"""Live progress of `exec`, end to end: on a terminal only, out of stdout's way, and
its figures the same as `--stats`'s.

stderr is a real pseudo-terminal (``os.openpty``) in one run and a pipe in the others;
stdout is always a pipe, so its bytes can be compared between the runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from e2e_util import client_env, descendants, exec_argv, run_exec, write_random

from topyaz_mount.client.config import human_size as human

SIZE = 3 << 20
# The job prints a binary input whole and copies it: both directions move bytes.
COMMAND = ["sh", "-c", 'cat "$1"; cp "$1" "$2"; echo end', "sh", "./in.bin", "./out.bin"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _run_on_pty(argv: list[str], cwd: Path, timeout: float = 120,
                env: dict | None = None) -> tuple[int, bytes, bytes]:
    """Run ``argv`` with stderr on a new pty and stdout on a pipe: (status, stdout, pty)."""
    master, slave = os.openpty()
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: every writer of the slave is gone
                return
            if not data:
                return
            seen.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env or client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    reader.join(10)
    os.close(master)
    return proc.returncode, out, b"".join(seen)


def _stats(stderr: bytes) -> dict:
    lines = [line for line in ANSI.sub(b"", stderr).splitlines() if line.startswith(b"{")]
    return [json.loads(line) for line in lines if b"wall_seconds" in line][-1]


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "client"
    root.mkdir(mode=0o700)
    write_random(root / "in.bin", SIZE)
    return root


def _drawn_and_cleared(tty_err: bytes) -> dict:
    """The line was drawn in place (carriage return, erase to the end of the line), its
    last frame says "done" with the figures of ``--stats=json``, and it was cleared."""
    stats = _stats(tty_err)
    frames = [f for f in re.split(rb"\r", tty_err) if b"topyaz-mount" in f and b"\x1b[K" in f]
    assert frames, tty_err
    last = ANSI.sub(b"", frames[-1]).decode()
    assert "done" in last
    assert f"in {human(stats['content_bytes_sent'])}" in last
    assert f"out {human(stats['content_bytes_received'])} in 1 files" in last
    erase = tty_err.rindex(b"\x1b[K")
    assert tty_err[erase - 1 : erase] == b"\r"  # the last thing drawn is the clearing
    return stats


def test_progress_on_a_terminal_only_and_its_figures_are_the_stats(testhost, root):
    argv = exec_argv(testhost, root, COMMAND, options=["--stats=json"])
    code, tty_out, tty_err = _run_on_pty(argv, root)
    assert code == 0, tty_err.decode(errors="replace")
    data = (root / "in.bin").read_bytes()
    assert tty_out == data + b"end\n"
    assert (root / "out.bin").read_bytes() == data
    _drawn_and_cleared(tty_err)

    (root / "out.bin").unlink()
    piped = run_exec(testhost, root, *COMMAND, options=["--stats=json"])
    assert piped.returncode == 0
    assert piped.stdout == tty_out  # byte for byte, with and without the progress
    assert b"\x1b[" not in piped.stderr and b"\r" not in piped.stderr

    (root / "out.bin").unlink()
    code, quiet_out, quiet_err = _run_on_pty(argv[:-len(COMMAND) - 1] + ["-q", "--", *COMMAND],
                                             root)
    assert code == 0 and quiet_out == tty_out
    assert b"\x1b[K" not in quiet_err


def test_json_progress_lines_end_with_the_stats_figures(testhost, root):
    first = run_exec(testhost, root, *COMMAND)  # the remote cache now has in.bin
    assert first.returncode == 0
    (root / "out.bin").unlink()
    r = run_exec(testhost, root, *COMMAND, options=["--json-progress", "--stats=json"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == first.stdout
    assert (root / "out.bin").read_bytes() == (root / "in.bin").read_bytes()
    records = [json.loads(line) for line in r.stderr.splitlines() if line.startswith(b"{")]
    progress = [p for p in records if "phase" in p]
    stats = records[-1]
    assert progress and progress[-1]["phase"] == "done"
    final = progress[-1]
    assert final["in_bytes"] == stats["content_bytes_sent"]
    assert final["out_bytes"] == stats["content_bytes_received"] == SIZE
    assert final["out_files"] == stats["files_committed"] == 1
    assert final["out_pending"] == 0
    assert final["in_expected"] + final["in_skipped"] == SIZE
    assert final["in_skipped"] == SIZE  # cached by the first run: shown as skipped


def test_quiet_and_json_progress_together_are_a_usage_error(testhost, root):
    r = run_exec(testhost, root, "true", options=["-q", "--json-progress"])
    assert r.returncode == 2
    assert b"--quiet and --json-progress" in r.stderr


def test_api_progress_callback_ends_with_the_result_stats(testhost, root):
    from test_api_e2e import remote_host

    from topyaz_mount.api import RemoteMount

    seen = []
    with RemoteMount(remote_host(testhost), root) as remote:
        quiet = remote.run(COMMAND, cwd=root)  # no callback: no progress anywhere
        (root / "out.bin").unlink()
        done = remote.run(COMMAND, cwd=root, on_progress=seen.append, progress_interval=0.1)
    assert quiet.returncode == done.returncode == 0
    assert done.stdout == quiet.stdout
    assert seen and all(p.phase == "running" for p in seen[:-1]) and seen[-1].phase == "done"
    final = seen[-1]
    assert final.in_bytes == done.stats["content_bytes_sent"]
    assert final.out_bytes == done.stats["content_bytes_received"] == SIZE
    assert final.out_files == done.stats["files_committed"] == 1


def test_status_shows_a_sessions_transfer_figures(testhost, root, tmp_path):
    from test_session_e2e import MountedSession

    session = MountedSession(testhost, root, tmp_path / "runtime", "prog")
    try:
        session.start()
        r = session.exec(*COMMAND)
        assert r.returncode == 0 and r.stdout == (root / "in.bin").read_bytes() + b"end\n"
        info = session.status()
        assert info["progress_phase"] == "mounted"
        assert info["progress_out_bytes"] == SIZE and info["progress_out_files"] == 1
        assert info["progress_in_bytes"] == info["content_bytes_sent"]
        text = session.cli("status", "prog")
        assert f"out {human(SIZE)} in 1 files".encode() in text.stdout, text.stdout
    finally:
        session.close()


def test_a_paced_session_moves_every_byte_both_ways(testhost, root):
    """Under --bwlimit (both ways, then up only) the job's outputs and stdout are whole;
    the rate itself is measured in tools/bench_progress.py, not asserted here."""
    for limit in ("8M", "8M:"):
        r = run_exec(testhost, root, *COMMAND, options=["--bwlimit", limit, "--stats=json"])
        assert r.returncode == 0, r.stderr
        assert r.stdout == (root / "in.bin").read_bytes() + b"end\n"
        assert (root / "out.bin").read_bytes() == (root / "in.bin").read_bytes()
        assert _stats(r.stderr)["content_bytes_received"] == SIZE
        (root / "out.bin").unlink()


def test_a_bad_bwlimit_is_one_line_and_status_2(testhost, root):
    r = run_exec(testhost, root, "true", options=["--bwlimit", "fast"])
    assert r.returncode == 2
    assert r.stderr.count(b"\n") == 1 and b"--bwlimit 'fast'" in r.stderr, r.stderr


def test_a_foreground_mount_on_a_terminal_shows_the_sessions_line_and_clears_it(
    testhost, root, tmp_path
):
    from e2e_util import wait_until
    from test_session_e2e import MountedSession

    session = MountedSession(testhost, root, tmp_path / "runtime", "fg")
    master, slave = os.openpty()
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:
                return
            if not data:
                return
            seen.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(session.mount_argv(), env=session.env, cwd=root,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    try:
        assert wait_until(lambda: session.cli("status", "fg").returncode == 0, 60)
        session.pid = proc.pid
        session.remember_ssh()
        r = session.exec(*COMMAND)
        assert r.returncode == 0 and r.stdout == (root / "in.bin").read_bytes() + b"end\n"
        line = f"out {human(SIZE)} in 1 files".encode()
        assert wait_until(lambda: line in b"".join(seen), 10), b"".join(seen)
        assert session.unmount().returncode == 0
        proc.wait(60)
    finally:
        session.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        os.close(master)
    shown = b"".join(seen)
    assert proc.returncode == 0, shown
    assert b"mounted" in shown and b"\x1b[K" in shown
    # The line is cleared before the session's last words ("... unmounted").
    tail = shown[shown.rindex(b"\x1b[K") - 1 :]
    assert tail.startswith(b"\r\x1b[K") and b"session fg unmounted" in tail


def test_verbose_log_lines_step_around_the_line(testhost, root):
    """Each -v log line starts on a line of its own: the progress line is cleared just
    before it (or was not drawn), and is not drawn into it before it ends."""
    argv = exec_argv(testhost, root, COMMAND, options=["-v", "--stats=json"])
    code, out, err = _run_on_pty(argv, root)
    assert code == 0, err.decode(errors="replace")
    assert out == (root / "in.bin").read_bytes() + b"end\n"
    assert (root / "out.bin").read_bytes() == (root / "in.bin").read_bytes()
    _drawn_and_cleared(err)
    starts = [m.start() for m in re.finditer(rb"topyaz-mount: INFO", err)]
    assert len(starts) >= 2, err
    cleared = 0
    for at in starts:
        before = err[:at]
        assert before == b"" or before.endswith((b"\n", b"\r\x1b[K")), err[at - 200 : at + 80]
        cleared += before.endswith(b"\r\x1b[K")
        assert b"\r" not in err[at : err.index(b"\n", at) - 1], err[at : at + 300]
    assert cleared, err  # at least one came while the line was shown (the manifest's)


def test_a_sessions_command_and_shell_show_their_own_figures(testhost, root, tmp_path):
    """`exec --session` and `shell`: the same line on a terminal, with the figures of
    the command (those of its --stats), cleared; none when piped; JSON when asked.
    Each run writes an output of its own name: a local delete reaches the session's
    host later (the watcher), and would race with the next run writing the same name."""
    from e2e_util import CLI
    from test_session_e2e import MountedSession

    write_random(root / "in2.bin", SIZE)  # the shell's input: new to the remote cache
    outputs = iter(range(100))

    def command(verb: str) -> tuple[list[str], Path]:
        out = f"out{next(outputs)}.bin"
        if verb == "exec":
            return [*COMMAND[:-1], f"./{out}"], root / out
        return ["sh", "-c", 'cp "$1" "$2"; echo end', "sh", "./in2.bin", f"./{out}"], root / out

    session = MountedSession(testhost, root, tmp_path / "runtime", "live")
    try:
        session.start()
        for verb, source in (("exec", "in.bin"), ("shell", "in2.bin")):
            data = (root / source).read_bytes()
            argv, out = command(verb)
            code, tty_out, tty_err = _run_on_pty(
                [*CLI, verb, "--session", "live", "--stats=json", "--", *argv], root,
                env=session.env,
            )
            assert code == 0, tty_err.decode(errors="replace")
            stats = _drawn_and_cleared(tty_err)
            assert out.read_bytes() == data
            assert stats["content_bytes_received"] == SIZE
            argv, out = command(verb)
            piped = session.cli(verb, "--session", "live", "--", *argv)
            assert piped.returncode == 0, piped.stderr
            assert piped.stdout == tty_out  # byte for byte, with and without the line
            assert b"\x1b[" not in piped.stderr and b"\r" not in piped.stderr
            assert out.read_bytes() == data
        argv, out = command("exec")
        code, quiet_out, quiet_err = _run_on_pty(
            [*CLI, "exec", "--session", "live", "-q", "--", *argv], root, env=session.env
        )
        assert code == 0 and quiet_out == (root / "in.bin").read_bytes() + b"end\n"
        assert b"\x1b[K" not in quiet_err and out.read_bytes() == (root / "in.bin").read_bytes()
        argv, out = command("exec")
        r = session.cli("exec", "--session", "live", "--json-progress", "--stats=json", "--",
                        *argv)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (root / "in.bin").read_bytes() + b"end\n"
        assert out.read_bytes() == (root / "in.bin").read_bytes()
        records = [json.loads(line) for line in r.stderr.splitlines() if line.startswith(b"{")]
        final, stats = [p for p in records if "phase" in p][-1], records[-1]
        assert final["phase"] == "done"
        assert final["in_bytes"] == stats["content_bytes_sent"]
        assert final["out_bytes"] == stats["content_bytes_received"] == SIZE
        assert final["out_files"] == stats["files_committed"] == 1
        assert final["in_expected"] + final["in_skipped"] == SIZE
    finally:
        session.close()
