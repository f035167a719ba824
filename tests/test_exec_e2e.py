"""End to end: the real `topyaz-mount exec` CLI, a real sshd, a real FUSE mount.

Each test runs `python -m topyaz_mount.cli exec --remote tmremote@127.0.0.1:PORT -F
<ssh_config> --remote-python <testhost venv python> --root <client root> -- COMMAND`
as a subprocess (tests/e2e_util.py) against the session's test host (tools/testhost.py),
and checks what a user would: bytes of the outputs on the client, stdout/stderr, the
exit status, and that nothing is left behind (see `no_leftovers`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_util import (
    REMOTE_USER,
    STANDINS_DIR,
    descendants,
    describe,
    fuse_denied_to_remote_user,
    group_members,
    pid_alive,
    run_exec,
    session_agent_pid,
    session_dirs,
    sessions_dir,
    start_exec,
    temp_files,
    unmount_lazy,
    wait_until,
    write_random,
)

from topyaz_mount.client.fileserver import LEFTOVER_AGE

pytestmark = [pytest.mark.e2e, pytest.mark.both_os_calls]

UNICODE_NAME = "Café photo – 写真 01.png"
MiB = 1 << 20


# --------------------------------------------------------------------------- leftovers


def _belongs_to_us(session: Path, our_pids: set[int]) -> bool:
    """A session dir is ours (or an orphan) unless a live agent of another sshd holds it.

    Other test hosts may share the user tmremote at the same time; their live sessions
    are none of our business.
    """
    pid = session_agent_pid(session)
    if pid is None or not pid_alive(pid):
        return True
    return pid in our_pids


def _leftovers(testhost, tmp_path: Path, mounts_before: set[str], sessions_before: set[str]):
    ours = descendants(testhost.pid)
    mounts = [
        m for m in testhost.remote_mounts()
        if m not in mounts_before and _belongs_to_us(Path(m).parent, ours)
    ]
    sessions = [
        s for s in session_dirs() if s not in sessions_before and _belongs_to_us(Path(s), ours)
    ]
    return mounts, sessions, temp_files(tmp_path)


@pytest.fixture(autouse=True)
def no_leftovers(testhost, tmp_path):
    """After each test: no FUSE mount of tmremote, no session dir, no commit temporaries.

    Teardown gets ~2.5 s to finish. Whatever is still there is removed (lazy unmount,
    rm -rf) and the test fails.
    """
    mounts_before = set(testhost.remote_mounts())
    sessions_before = session_dirs()
    yield
    found = ([], [], [])

    def clean() -> bool:
        nonlocal found
        found = _leftovers(testhost, tmp_path, mounts_before, sessions_before)
        return not any(found)

    if wait_until(clean, 2.5):
        return
    mounts, sessions, temps = found
    for m in mounts:
        unmount_lazy(m)
    for s in sessions:
        shutil.rmtree(s, ignore_errors=True)
    for t in temps:
        with contextlib.suppress(OSError):
            if t.is_dir() and not t.is_symlink():
                shutil.rmtree(t)
            else:
                t.unlink()
    pytest.fail(
        f"left behind after the test: mounts={mounts} session dirs={sessions} "
        f"commit temporaries={[str(t) for t in temps]}",
        pytrace=False,
    )


# --------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def run_local(*argv, cwd: Path) -> None:
    subprocess.run([str(a) for a in argv], cwd=cwd, check=True, capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=120)


def standin(name: str) -> list[str]:
    return [sys.executable, str(STANDINS_DIR / name)]


def assert_one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    err = r.stderr.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert r.returncode == code, describe(r)
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("topyaz-mount: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_copy(tmp_path, samples_dir) -> Path:
    """A separate local copy of the samples for running the stand-ins locally."""
    work = tmp_path / "local"
    shutil.copytree(samples_dir, work)
    return work


# --------------------------------------------------------------------------- Topaz jobs


def test_image_job_matches_local(testhost, client_root, local_copy):
    src = client_root / UNICODE_NAME
    r = run_exec(testhost, client_root, "tpai", "--cli", src, "-o", "out")
    assert r.returncode == 0, describe(r)
    run_local(*standin("tpai"), "--cli", local_copy / UNICODE_NAME, "-o", local_copy / "out",
              cwd=local_copy)
    assert (client_root / "out" / UNICODE_NAME).read_bytes() == \
        (local_copy / "out" / UNICODE_NAME).read_bytes()
    assert digests(client_root / "out") == digests(local_copy / "out")
    assert b"Processing " in r.stdout


def test_directory_batch_job_matches_local(testhost, client_root, local_copy):
    for base in (client_root, local_copy):
        (base / "shots").mkdir()
        for name in ("gradient.png", "noise.jpg", UNICODE_NAME, "small.tiff", "clip.mp4"):
            shutil.copy2(base / name, base / "shots" / name)
    outdir = client_root / "out" / "giga"
    r = run_exec(testhost, client_root,
                 "gigapixel", "--cli", "-i", "shots", "-o", outdir, "--scale", "2")
    assert r.returncode == 0, describe(r)
    run_local(*standin("gigapixel"), "--cli", "-i", "shots", "-o", "out/giga", "--scale", "2",
              cwd=local_copy)
    remote_out, local_out = digests(outdir), digests(local_copy / "out" / "giga")
    assert sorted(remote_out) == sorted(local_out) == [
        "Café photo – 写真 01.png", "gradient.png", "noise.jpg", "small.tiff",
    ]
    assert remote_out == local_out
    # The inputs are untouched.
    assert digests(client_root / "shots") == digests(local_copy / "shots")


FFMPEG_ARGS = ["-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", "clip.mp4",
               "-vf", "scale=640:480", "-c:v", "libx264", "-preset", "ultrafast",
               "-threads", "1", "-pix_fmt", "yuv420p", "-bitexact", "-map_metadata", "-1",
               "-fflags", "+bitexact", "-flags:v", "+bitexact"]


def test_video_job_matches_local_ffmpeg(testhost, client_root, local_copy):
    (client_root / "out").mkdir()
    r = run_exec(testhost, client_root, "ffmpeg", *FFMPEG_ARGS, "out/clip 2x.mp4")
    assert r.returncode == 0, describe(r)
    (local_copy / "out").mkdir()
    run_local("ffmpeg", *FFMPEG_ARGS, "out/clip 2x.mp4", cwd=local_copy)
    local = (local_copy / "out" / "clip 2x.mp4").read_bytes()
    assert len(local) > 1000
    assert (client_root / "out" / "clip 2x.mp4").read_bytes() == local


@pytest.mark.parametrize(
    "product, src, produced",
    [
        ("photo", "noise.jpg", "noise__photo_ai.jpg"),
        ("giga", "gradient.png", "gradient_iGigapixelAI.png"),
        ("video", "clip.mp4", "clip_iVideoAI.mp4"),
    ],
)
def test_product_shortcut_matches_local(testhost, client_root, local_copy, product, src,
                                        produced):
    # `exec ... video clip.mp4` (no `--`) runs `topyaz video clip.mp4` on the remote.
    r = run_exec(testhost, client_root, product, src, dashdash=False)
    assert r.returncode == 0, describe(r)
    run_local(*standin("topyaz"), product, src, cwd=local_copy)
    assert (client_root / produced).read_bytes() == (local_copy / produced).read_bytes()
    assert digests(client_root) == digests(local_copy)


# --------------------------------------------------------------------------- stdio, status


def test_stdout_stderr_separate_and_exit_status(testhost, client_root):
    r = run_exec(testhost, client_root, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n"), describe(r)

    script = "printf 'a\\000b\\377'; printf 'e1\\n' >&2; printf 'o2\\n'; printf 'e2\\n' >&2"
    r = run_exec(testhost, client_root, "sh", "-c", script)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"a\0b\xffo2\n", b"e1\ne2\n"), describe(r)


def test_large_stdout_passes_through(testhost, client_root):
    blob = os.urandom(3 * MiB + 17)
    (client_root / "blob.bin").write_bytes(blob)
    r = run_exec(testhost, client_root, "cat", "blob.bin")
    assert r.returncode == 0, describe(r)
    assert r.stdout == blob
    assert r.stderr == b""


def test_missing_remote_command_exits_127(testhost, client_root):
    r = run_exec(testhost, client_root, "no-such-command-tm42", "x")
    assert r.returncode == 127, describe(r)
    err = r.stderr.decode(errors="replace")
    assert "no-such-command-tm42" in err
    assert "Traceback" not in err


def test_stdin_is_forwarded_with_option(testhost, client_root):
    data = b"line one\nline two\n" * 1000
    r = run_exec(testhost, client_root, "sh", "-c", "cat > got.txt; wc -c < got.txt",
                 options=["--stdin"], stdin_data=data)
    assert r.returncode == 0, describe(r)
    assert r.stdout.strip() == str(len(data)).encode()
    assert (client_root / "got.txt").read_bytes() == data
    # Without --stdin the command reads /dev/null.
    r = run_exec(testhost, client_root, "sh", "-c", "cat | wc -c")
    assert (r.returncode, r.stdout.strip()) == (0, b"0"), describe(r)


# --------------------------------------------------------------------------- signals


HANDLE_SIGNAL = r"""
import os, signal, sys, time
def on_signal(signum, frame):
    os.write(1, ("got-" + signal.Signals(signum).name + "\n").encode())
    os._exit(42)
signal.signal(signal.SIG{name}, on_signal)
os.write(1, b"ready\n")
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_ctrl_c_is_forwarded_and_status_returned(testhost, client_root, sig):
    # (A Python job rather than `sh -c 'trap ...; echo ready; sleep 60'`: dash runs a trap
    # only after its foreground child ends, and a signal landing while sh is between
    # fork and exec of `sleep` is lost by the child, so that job may sleep on. os.write,
    # not print: a handler that prints while print("ready") is still flushing fails.)
    name = signal.Signals(sig).name[3:]
    with start_exec(testhost, client_root, "python3", "-c", HANDLE_SIGNAL.format(name=name)) as p:
        assert p.wait_for_stdout(b"ready\n", 30), (p.stdout, p.stderr)
        p.send_signal(sig)
        r = p.wait(30)
    assert r.returncode == 42, describe(r)
    assert r.stdout == f"ready\ngot-SIG{name}\n".encode(), describe(r)
    assert b"Traceback" not in r.stderr


def test_ctrl_c_ends_a_job_that_does_not_handle_it_with_130(testhost, client_root):
    script = "echo ready; exec sleep 60"
    with start_exec(testhost, client_root, "sh", "-c", script) as p:
        assert p.wait_for_stdout(b"ready\n", 30), (p.stdout, p.stderr)
        p.send_signal(signal.SIGINT)
        r = p.wait(30)
    assert r.returncode == 128 + signal.SIGINT, describe(r)
    assert r.stdout == b"ready\n"
    assert b"Traceback" not in r.stderr


IGNORE_INT = r"""
import os, signal, time
def on_int(signum, frame):
    os.write(1, b"ignored-int\n")
signal.signal(signal.SIGINT, on_int)
os.write(1, b"ready\n")
while True:
    time.sleep(0.05)
"""


def test_second_ctrl_c_kills_a_job_that_ignores_the_first(testhost, client_root):
    with start_exec(testhost, client_root, "python3", "-c", IGNORE_INT) as p:
        assert p.wait_for_stdout(b"ready\n", 30), (p.stdout, p.stderr)
        p.send_signal(signal.SIGINT)
        assert p.wait_for_stdout(b"ignored-int\n", 30), (p.stdout, p.stderr)
        assert p.proc.poll() is None  # the job ignored it and is still running
        p.send_signal(signal.SIGINT)
        r = p.wait(30)
    # killed by SIGKILL on the remote: a shell-style 128 + 9
    assert r.returncode == 128 + signal.SIGKILL, describe(r)
    assert r.stdout == b"ready\nignored-int\n"
    assert b"Traceback" not in r.stderr


def test_killed_client_remote_cleans_up(testhost, client_root):
    before = session_dirs()
    script = 'echo "pid=$$"; echo ready; sleep 60'
    # A session that ends with its client (a detachable one waits: test_reconnect_e2e).
    with start_exec(testhost, client_root, "sh", "-c", script, options=["--grace", "0"]) as p:
        assert p.wait_for_stdout(b"ready\n", 30), (p.stdout, p.stderr)
        job_pid = int(p.stdout.split(b"pid=")[1].split(b"\n")[0])
        assert pid_alive(job_pid)
        new = [s for s in session_dirs() - before if session_agent_pid(s) in
               descendants(testhost.pid)]
        assert len(new) == 1, new
        session = new[0]
        agent_pid = session_agent_pid(session)
        assert agent_pid is not None and pid_alive(agent_pid)
        ssh = p.remember_ssh()
        assert ssh, "no ssh child found"
        p.send_signal(signal.SIGKILL)
        p.proc.wait(10)

        def gone() -> bool:
            return (
                not group_members(job_pid)
                and not pid_alive(agent_pid)
                and not os.path.exists(session)
                and not any(m.startswith(session + "/") for m in testhost.remote_mounts())
            )

        assert wait_until(gone, 15, 0.1), (
            f"job group alive: {group_members(job_pid)}, agent alive: {pid_alive(agent_pid)}, "
            f"session dir: {os.path.exists(session)}, mounts: {testhost.remote_mounts()}"
        )
        assert temp_files(client_root) == []
    # (p.close() ended any ssh child still alive, by pid)
    for pid in ssh:
        assert not pid_alive(pid)


def test_killed_client_during_a_commit_leaves_no_temp_file(testhost, client_root, os_calls):
    """Never a partial output. Linux's unnamed temp file goes with the client; the
    portable one (macOS) stays hidden until a later session's commit there collects it."""
    before = session_dirs()
    size = 150 * MiB
    script = f'head -c {size} /dev/zero > big.bin; echo ready; sleep 60'
    session = None
    try:
        with start_exec(testhost, client_root, "sh", "-c", script,
                        options=["--grace", "0"]) as p:
            def commit_in_flight() -> bool:
                # a named temp file, or an unnamed (O_TMPFILE) one held open by the client
                return bool(temp_files(client_root)) or any(
                    t.startswith(str(client_root)) and "(deleted)" in t
                    for t in open_files(p.proc.pid)
                )

            seen = wait_until(lambda: commit_in_flight() or p.proc.poll() is not None, 60, 0.002)
            assert seen and p.proc.poll() is None, (
                f"no commit seen in flight: {p.stdout!r} {p.stderr!r}"
            )
            ours = descendants(testhost.pid)
            new = [s for s in session_dirs() - before if session_agent_pid(s) in ours]
            session = new[0] if new else None
            p.send_signal(signal.SIGKILL)
            p.proc.wait(10)
            assert not (client_root / "big.bin").exists()  # never a partial output

            def remote_gone() -> bool:
                return (session is None or not os.path.exists(session)) and not any(
                    s in session_dirs() for s in new
                )

            assert wait_until(remote_gone, 15, 0.1)
        assert not (client_root / "big.bin").exists()
        if os_calls == "portable":
            (left,) = temp_files(client_root)
            old = time.time() - LEFTOVER_AGE - 60  # as if the crash was a while ago
            os.utime(left, (old, old))
            r = run_exec(testhost, client_root, "sh", "-c", "echo again > big.bin")
            assert r.returncode == 0, describe(r)
            assert (client_root / "big.bin").read_bytes() == b"again\n"
        assert temp_files(client_root) == []
    finally:
        for t in temp_files(client_root):
            t.unlink()
        if session is not None:
            kept = sessions_dir().parent / "kept" / Path(session).name
            shutil.rmtree(kept, ignore_errors=True)


def open_files(pid: int) -> list[str]:
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


# --------------------------------------------------------------------------- names


AWKWARD = ["-x 'q' é.bin", 'dq "x" $HOME `id` ü.txt', "sp  ace\ttab.dat", "--weird=name.bin",
           "写真 ☃.raw"]


def test_awkward_file_names_as_inputs_and_outputs(testhost, client_root):
    (client_root / "out").mkdir()
    contents = {}
    for i, name in enumerate(AWKWARD):
        data = f"{i}:{name}\n".encode() + os.urandom(100)
        (client_root / name).write_bytes(data)
        contents[name] = data
    # relative names (cp -- ...), each to an output name that is just as awkward
    argv = ["cp", "--", *AWKWARD, "out/"]
    r = run_exec(testhost, client_root, *argv)
    assert r.returncode == 0, describe(r)
    for name, data in contents.items():
        assert (client_root / "out" / name).read_bytes() == data
    # absolute input and absolute output with awkward names
    src = client_root / AWKWARD[0]
    dst = client_root / "out" / "-y \"r\" ñ copy.bin"
    r = run_exec(testhost, client_root, "cp", "--", src, dst)
    assert r.returncode == 0, describe(r)
    assert dst.read_bytes() == contents[AWKWARD[0]]
    # names pass through to the command exactly
    r = run_exec(testhost, client_root, "ls", "-1", "--quoting-style=literal", "out")
    assert r.returncode == 0, describe(r)
    assert sorted(r.stdout.decode().splitlines()) == sorted(
        [*AWKWARD, "-y \"r\" ñ copy.bin"]
    )


# --------------------------------------------------------------------------- filesystem ops


def test_cp_mv_rm_mkdir_rmdir(testhost, client_root, samples_dir):
    (client_root / "emptydir").mkdir()
    (client_root / "doomed.txt").write_text("bye\n")
    script = " && ".join([
        "mkdir -p made/deep/er",
        "cp noise.jpg made/deep/er/copy.jpg",
        "cp small.tiff out1.tiff",
        "mv out1.tiff made/out2.tiff",  # rename of an output
        "mv gradient.png renamed.png",  # rename of an input
        "echo fresh > new.txt",
        "mv new.txt moved.txt",  # rename of a just-written output
        "rm doomed.txt",
        "rmdir emptydir",
        "mkdir -p gone/sub && rmdir gone/sub",
    ])
    r = run_exec(testhost, client_root, "sh", "-c", script)
    assert r.returncode == 0, describe(r)
    c = client_root
    assert (c / "made/deep/er").is_dir()
    assert (c / "made/deep/er/copy.jpg").read_bytes() == (samples_dir / "noise.jpg").read_bytes()
    assert not (c / "out1.tiff").exists()
    assert (c / "made/out2.tiff").read_bytes() == (samples_dir / "small.tiff").read_bytes()
    assert (c / "small.tiff").read_bytes() == (samples_dir / "small.tiff").read_bytes()
    assert not (c / "gradient.png").exists()
    assert (c / "renamed.png").read_bytes() == (samples_dir / "gradient.png").read_bytes()
    assert not (c / "new.txt").exists()
    assert (c / "moved.txt").read_text() == "fresh\n"
    assert not (c / "doomed.txt").exists()
    assert not (c / "emptydir").exists()
    assert (c / "gone").is_dir() and not (c / "gone/sub").exists()


def test_ls_and_cat(testhost, client_root, samples_dir):
    (client_root / "sub").mkdir()
    (client_root / "sub" / "note.txt").write_text("hello through the mount\n")
    os.chmod(client_root / "sub" / "note.txt", 0o640)
    r = run_exec(testhost, client_root, "ls", "-la", "--quoting-style=literal", ".", "sub")
    assert r.returncode == 0, describe(r)
    listing = r.stdout.decode()
    for name in ("gradient.png", "noise.jpg", UNICODE_NAME, "small.tiff", "clip.mp4", "sub"):
        assert name in listing, listing
    size = (samples_dir / "noise.jpg").stat().st_size
    noise_line = next(line for line in listing.splitlines() if line.endswith(" noise.jpg"))
    assert f" {size} " in noise_line, noise_line
    note_line = next(line for line in listing.splitlines() if line.endswith(" note.txt"))
    assert note_line.startswith("-rw-r-----"), note_line
    r = run_exec(testhost, client_root, "cat", "sub/note.txt", UNICODE_NAME)
    assert r.returncode == 0, describe(r)
    assert r.stdout == b"hello through the mount\n" + (samples_dir / UNICODE_NAME).read_bytes()


def test_append_keeps_existing_content(testhost, client_root):
    old = b"first line\n" + os.urandom(300_000) + b"\nlast old line\n"
    (client_root / "existing.txt").write_bytes(old)
    script = "echo x >> existing.txt; echo y >> existing.txt"
    r = run_exec(testhost, client_root, "sh", "-c", script)
    assert r.returncode == 0, describe(r)
    assert (client_root / "existing.txt").read_bytes() == old + b"x\ny\n"


def test_truncate(testhost, client_root):
    (client_root / "shrink.txt").write_bytes(b"0123456789")
    (client_root / "grow.txt").write_bytes(b"ab")
    (client_root / "empty-me.txt").write_bytes(b"abc" * 1000)
    script = "truncate -s 4 shrink.txt && truncate -s 20 grow.txt && : > empty-me.txt"
    r = run_exec(testhost, client_root, "sh", "-c", script)
    assert r.returncode == 0, describe(r)
    assert (client_root / "shrink.txt").read_bytes() == b"0123"
    assert (client_root / "grow.txt").read_bytes() == b"ab" + b"\0" * 18
    assert (client_root / "empty-me.txt").read_bytes() == b""


def test_in_place_edits_and_overwrites(testhost, client_root, samples_dir):
    (client_root / "s.txt").write_text("aaa\nbbb\n")
    (client_root / "d.bin").write_bytes(b"0123456789")
    shutil.copy(samples_dir / "noise.jpg", client_root / "overwrite-me.jpg")
    (client_root / "mv-dst.txt").write_text("old\n")
    (client_root / "mv-src.txt").write_text("new\n")
    script = " && ".join([
        "sed -i s/a/X/ s.txt",  # temp file + rename over the original
        "printf AB | dd of=d.bin bs=1 seek=3 conv=notrunc 2>/dev/null",  # in place
        "cp small.tiff overwrite-me.jpg",  # O_TRUNC over an existing file
        "mv -f mv-src.txt mv-dst.txt",  # rename over an existing file
        "echo hi > w.txt && chmod 750 w.txt && touch -d @1000000000 w.txt",
    ])
    r = run_exec(testhost, client_root, "sh", "-c", script)
    assert r.returncode == 0, describe(r)
    c = client_root
    assert (c / "s.txt").read_text() == "Xaa\nbbb\n"
    assert (c / "d.bin").read_bytes() == b"012AB56789"
    assert (c / "overwrite-me.jpg").read_bytes() == (samples_dir / "small.tiff").read_bytes()
    assert (c / "mv-dst.txt").read_text() == "new\n" and not (c / "mv-src.txt").exists()
    st = (c / "w.txt").stat()
    assert (c / "w.txt").read_text() == "hi\n"
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_mtime == 1_000_000_000


def test_python_copytree(testhost, client_root):
    tree = client_root / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "empty-dir").mkdir()
    files = {
        "top.txt": b"top\n",
        "a/mid.bin": os.urandom(2 * MiB + 5),
        "a/b/deep é.txt": b"deep\n",
        "a/b/zero": b"",
    }
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    os.chmod(tree / "top.txt", 0o600)
    os.utime(tree / "a/mid.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    code = "import shutil; shutil.copytree('tree', 'tree-copy')"
    r = run_exec(testhost, client_root, "python3", "-c", code)
    assert r.returncode == 0, describe(r)
    copy = client_root / "tree-copy"
    for rel, data in files.items():
        assert (copy / rel).read_bytes() == data, rel
    assert (copy / "empty-dir").is_dir()
    assert stat.S_IMODE((copy / "top.txt").stat().st_mode) == 0o600
    # copy2 keeps modification times
    assert (copy / "a/mid.bin").stat().st_mtime_ns == (tree / "a/mid.bin").stat().st_mtime_ns
    assert digests(copy) == digests(tree)


def test_symlinks_inside_root(testhost, client_root):
    (client_root / "target.txt").write_text("T\n")
    (client_root / "sub").mkdir()
    (client_root / "sub" / "inner.txt").write_text("I\n")
    os.symlink("target.txt", client_root / "link.txt")
    os.symlink("sub", client_root / "sublink")
    os.symlink("../target.txt", client_root / "sub" / "up.txt")
    script = ("cat link.txt sublink/inner.txt sub/up.txt && readlink link.txt && "
              "ln -s target.txt made-remotely && cat made-remotely")
    r = run_exec(testhost, client_root, "sh", "-c", script)
    assert r.returncode == 0, describe(r)
    assert r.stdout == b"T\nI\nT\ntarget.txt\nT\n"
    made = client_root / "made-remotely"
    assert made.is_symlink() and os.readlink(made) == "target.txt"
    assert (client_root / "link.txt").is_symlink()  # untouched


# --------------------------------------------------------------------------- large files


def test_large_input_read_remotely(testhost, client_root):
    digest = write_random(client_root / "big input.bin", 50 * MiB)
    r = run_exec(testhost, client_root, "sha256sum", "big input.bin", timeout=120)
    assert r.returncode == 0, describe(r)
    assert r.stdout.decode().split()[0] == digest


def test_large_output_written_remotely(testhost, client_root):
    script = f"head -c {50 * MiB} /dev/urandom > out.bin && sha256sum out.bin"
    r = run_exec(testhost, client_root, "sh", "-c", script, timeout=120)
    assert r.returncode == 0, describe(r)
    out = client_root / "out.bin"
    assert out.stat().st_size == 50 * MiB
    assert r.stdout.decode().split()[0] == sha256(out)


# --------------------------------------------------------------------------- errors


def test_path_outside_root_is_refused_and_wider_root_works(testhost, client_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "outside.txt"
    outside.write_text("from outside\n")
    r = run_exec(testhost, client_root, "cat", outside)
    assert_one_line_error(r, 2, str(outside), "--root")
    assert r.stdout == b""
    # relative, and as the value of a --flag=PATH
    r = run_exec(testhost, client_root, "cat", "../elsewhere/outside.txt")
    assert_one_line_error(r, 2, "../elsewhere/outside.txt", "--root")
    r = run_exec(testhost, client_root, "cat", f"--input={outside}")
    assert_one_line_error(r, 2, str(outside), "--root")
    # The same command with the root widened to a directory holding both works.
    r = run_exec(testhost, tmp_path, "cat", outside, cwd=client_root)
    assert r.returncode == 0, describe(r)
    assert r.stdout == b"from outside\n"


def test_unreachable_host(testhost, client_root):
    port = free_port()
    r = run_exec(testhost, client_root, "true", remote=f"{REMOTE_USER}@127.0.0.1:{port}")
    assert r.returncode != 0
    assert_one_line_error(r, 255, "127.0.0.1")


def test_remote_without_the_package(testhost, client_root):
    r = run_exec(testhost, client_root, "true", remote_python="/usr/bin/python3")
    assert_one_line_error(r, 255, "topyaz-mount is not installed")


def test_remote_without_usable_dev_fuse(testhost, client_root):
    with fuse_denied_to_remote_user():
        r = run_exec(testhost, client_root, "true", options=["--backend", "fuse"])
    assert_one_line_error(r, 255, "/dev/fuse")
    assert run_exec(testhost, client_root, "true", options=["--backend", "fuse"]).returncode == 0


def test_remote_user_sees_root_only_through_the_mount(testhost, client_root, samples_dir):
    target = client_root / "gradient.png"
    r = run_exec(testhost, client_root, "cat", target)
    assert r.returncode == 0, describe(r)
    assert r.stdout == (samples_dir / "gradient.png").read_bytes()
    direct = testhost.run(f"cat {shlex.quote(str(target))} > /dev/null")
    assert direct.returncode != 0
    assert "Permission denied" in direct.stderr


def test_metadata_change_on_a_file_opened_for_writing_but_not_written(testhost, client_root):
    """`touch -d` and fchmod open the file for writing and change only its metadata."""
    (client_root / "meta.txt").write_text("unchanged\n")
    script = ("touch -d @1000000000 meta.txt && python3 -c \"import os; "
              "f = open('meta.txt', 'r+'); os.fchmod(f.fileno(), 0o600)\"")
    r = run_exec(testhost, client_root, "sh", "-c", script)
    assert r.returncode == 0, describe(r)
    st = (client_root / "meta.txt").stat()
    assert (st.st_mtime, stat.S_IMODE(st.st_mode)) == (1_000_000_000, 0o600)
    assert (client_root / "meta.txt").read_text() == "unchanged\n"
