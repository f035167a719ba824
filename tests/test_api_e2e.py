"""End to end through the Python API: MountExecutor, RemoteMount and open_remote.

Every test talks to the session's test host (tools/testhost.py: a real sshd on
127.0.0.1, user tmremote, a real FUSE mount) from inside this process, the way topyaz or
a script would: no CLI subprocess. The checks are outcomes only: the bytes of outputs
on the client, what the command printed, its status, which exception we get, and that
nothing is left behind (`no_leftovers`: no FUSE mount, no session dir, no ssh child).

The remote user is shared with other test hosts that may be running at the same time,
so everything remote is scoped to *our* sshd (agents descended from it) or to a
process command line unique to the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import trio
from e2e_util import (
    all_pids,
    descendants,
    pid_alive,
    proc_stat,
    session_agent_pid,
    session_dirs,
    wait_until,
)

from topyaz_mount import (
    AuthenticationFailed,
    CompletedRun,
    ConnectionFailed,
    ExecutorContext,
    JobTimeout,
    MountExecutor,
    RemoteHost,
    RemoteMount,
    RemoteOptions,
    TopyazMountError,
    open_remote,
)
from topyaz_mount.client.translate import TranslationError

if sys.version_info >= (3, 11):
    pass
else:  # trio depends on the backport there
    pass

pytestmark = pytest.mark.e2e

REPO_DIR = Path(__file__).resolve().parent.parent
STANDINS_DIR = REPO_DIR / "tools" / "standins"
REMOTE_USER = os.environ.get("TOPYAZ_MOUNT_TESTHOST_USER", "tmremote")  # see tools/testhost.py
UNICODE_NAME = "Café photo – 写真 01.png"  # one of tools/make_samples.py's images
VIDEO_NAME = "clip.mp4"


# --------------------------------------------------------------------------- /proc


def ssh_children() -> list[int]:
    """Live `ssh` processes whose parent is this test process."""
    me = os.getpid()
    found = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None and st[0] == me and st[3] == "ssh" and st[2] != "Z":
            found.append(pid)
    return found


def processes_running(argv: list[str], uid: int) -> list[int]:
    """Live processes of user uid whose command line is exactly argv."""
    want = [a.encode() for a in argv]
    found = []
    for pid in all_pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if args and args[-1] == b"":
            args = args[:-1]
        if args == want and pid_alive(pid):
            found.append(pid)
    return found


def free_port() -> int:
    """A loopback port nobody listens on (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- leftovers


def _ours_or_orphan(session: Path, ours: set[int]) -> bool:
    """A session is ours (or nobody's) unless a live agent of another sshd holds it."""
    pid = session_agent_pid(session)
    if pid is None or not pid_alive(pid):
        return True
    return pid in ours


def _leftovers(testhost, mounts_before: set[str], sessions_before: set[str]):
    ours = descendants(testhost.pid)
    mounts = [
        m for m in testhost.remote_mounts()
        if m not in mounts_before and _ours_or_orphan(Path(m).parent, ours)
    ]
    sessions = [
        s for s in session_dirs() if s not in sessions_before and _ours_or_orphan(Path(s), ours)
    ]
    return mounts, sessions, ssh_children()


@pytest.fixture(autouse=True)
def no_leftovers(testhost):
    """After each test: no FUSE mount of tmremote, no session dir, no ssh child of ours.

    Teardown gets ~3 s. Whatever is still there is removed (lazy unmount, rm -rf, kill
    by pid) and the test fails.
    """
    mounts_before = set(testhost.remote_mounts())
    sessions_before = session_dirs()
    yield
    found: tuple[list, list, list] = ([], [], [])

    def clean() -> bool:
        nonlocal found
        found = _leftovers(testhost, mounts_before, sessions_before)
        return not any(found)

    if wait_until(clean, 3.0):
        return
    mounts, sessions, sshs = found
    for pid in sshs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for m in mounts:
        r = subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", m], capture_output=True)
    for s in sessions:
        shutil.rmtree(s, ignore_errors=True)
    pytest.fail(
        f"left behind after the test: mounts={mounts} session dirs={sessions} "
        f"ssh children={sshs}",
        pytrace=False,
    )


# --------------------------------------------------------------------------- helpers


def remote_options(testhost, **kw) -> RemoteOptions:
    return RemoteOptions(
        host="127.0.0.1",
        user=REMOTE_USER,
        ssh_port=testhost.port,
        ssh_config=str(testhost.ssh_config),
        remote_python=testhost.remote_python,
        **kw,
    )


def remote_host(testhost, **kw) -> RemoteHost:
    return RemoteHost(
        "127.0.0.1",
        user=REMOTE_USER,
        port=testhost.port,
        ssh_config=str(testhost.ssh_config),
        remote_python=testhost.remote_python,
        **kw,
    )


@pytest.fixture
def make_executor(testhost, client_root):
    """make_executor(env_vars=..., **context) -> a MountExecutor closed after the test."""
    made: list[MountExecutor] = []

    def make(options: RemoteOptions | None = None, **context) -> MountExecutor:
        context.setdefault("working_dir", str(client_root))
        ex = MountExecutor(options or remote_options(testhost), ExecutorContext(**context))
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.close()


@pytest.fixture
def local_copy(tmp_path, client_root) -> Path:
    """A second copy of the samples, for running the same tools locally."""
    local = tmp_path / "local"
    shutil.copytree(client_root, local)
    return local


def run_local(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=120)
    assert r.returncode == 0, f"local {argv[:2]} failed: {r.stderr.decode(errors='replace')}"
    return r


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def describe(result: tuple[int, str, str]) -> str:
    code, out, err = result
    return f"exit {code}\nstdout: {out[-2000:]!r}\nstderr: {err[-2000:]}"


# --------------------------------------------------------------------------- MountExecutor


def _tpai(root: Path, out: Path) -> list[str]:
    return ["tpai", "--cli", str(root / UNICODE_NAME), "-o", str(out)]


def _gigapixel(root: Path, out: Path) -> list[str]:
    return ["gigapixel", "--cli", "-i", str(root / "gradient.png"), "-o", str(out),
            "--scale", "2"]


def _ffmpeg(root: Path, out: Path) -> list[str]:
    return ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-i", str(root / VIDEO_NAME),
            "-vf", "scale=iw*2:ih*2", "-c:v", "libx264", "-preset", "ultrafast",
            "-bitexact", "-map_metadata", "-1", str(out / "clip-2x.mp4")]


@pytest.mark.parametrize("build", [_tpai, _gigapixel, _ffmpeg], ids=["tpai", "gigapixel",
                                                                    "ffmpeg"])
def test_executor_job_outputs_match_local_run(make_executor, client_root, local_copy, build):
    if build is _ffmpeg and not (client_root / VIDEO_NAME).exists():
        pytest.fail("the sample video is missing (is ffmpeg installed?)")
    remote_out = client_root / "out"
    local_out = local_copy / "out"
    remote_out.mkdir()
    local_out.mkdir()

    ex = make_executor()
    result = ex.execute(build(client_root, remote_out))
    assert result[0] == 0, describe(result)

    argv = build(local_copy, local_out)
    if argv[0] != "ffmpeg":
        argv = [sys.executable, str(STANDINS_DIR / argv[0]), *argv[1:]]
    run_local(argv, local_copy)

    got, want = files_under(remote_out), files_under(local_out)
    assert want, "the local run made no output"
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the local run"


def test_executor_passes_status_stdout_and_stderr_through(make_executor, client_root):
    ex = make_executor()
    assert ex.execute(["sh", "-c", "printf 'out 1\\nout 2\\n'; echo 'err é' >&2; exit 3"]) == (
        3, "out 1\nout 2\n", "err é\n"
    )
    # A tool's own failure: status 1 and its message, unchanged.
    code, out, err = ex.execute(["tpai", "--cli", str(client_root / "missing.png"), "-o",
                                 str(client_root / "out")])
    assert code == 1
    assert out == ""
    assert err.startswith("tpai: error: ") and err.endswith("missing.png: no such file\n")
    assert "topyaz-mount: error" not in err
    # A command that is not there: 127, as a shell would say.
    code, _, err = ex.execute(["no-such-command-xyz"])
    assert code == 127
    assert "no-such-command-xyz" in err


def test_outputs_in_a_new_directory_cost_no_lookup_round_trips(
    make_executor, client_root, monkeypatch
):
    """The job's own mkdir tells the agent the directory is empty, and the kernel's
    re-checks of the directory after each create are answered from what the agent saw:
    twenty outputs, yet only the job's first steps ask the client anything."""
    from topyaz_mount.client import fileserver

    counts: dict[str, int] = {}
    handle = fileserver.FileServer.handle

    async def counting(self, req):
        counts[type(req).__name__] = counts.get(type(req).__name__, 0) + 1
        return await handle(self, req)

    monkeypatch.setattr(fileserver.FileServer, "handle", counting)
    script = 'mkdir out && for i in $(seq 1 20); do echo "output $i" > "out/$i.txt"; done'
    assert make_executor().execute(["sh", "-c", script])[0] == 0
    for i in range(1, 21):
        assert (client_root / "out" / f"{i}.txt").read_text() == f"output {i}\n"
    assert counts.get("Mkdir") == 1
    assert counts.get("Stat", 0) + counts.get("ListDir", 0) <= 6, counts


def test_executor_timeout_kills_the_remote_command(make_executor, testhost):
    tmremote = pwd.getpwnam(REMOTE_USER).pw_uid
    argv = ["sleep", "61.25"]  # a command line no one else runs
    ex = make_executor()
    with pytest.raises(JobTimeout, match="limit"):
        ex.execute(argv, timeout=2)
    assert wait_until(lambda: not processes_running(argv, tmremote), 5), (
        "the remote sleep survived the timeout"
    )
    # The session is still usable after a timeout.
    assert ex.execute(["echo", "still here"]) == (0, "still here\n", "")
    mountpoint = ex.get_info()["mountpoint"]
    ex.close()
    assert wait_until(lambda: mountpoint not in testhost.remote_mounts(), 3)
    assert not Path(mountpoint).parent.exists()


def test_executor_timeout_from_context(make_executor):
    ex = make_executor(timeout=1)
    with pytest.raises(JobTimeout):
        ex.execute(["sleep", "62.5"])


def test_executor_dry_run_never_connects(client_root):
    ex = MountExecutor(
        RemoteOptions(host="127.0.0.1", user=REMOTE_USER, ssh_port=1, connection_timeout=2),
        ExecutorContext(working_dir=str(client_root), dry_run=True),
    )
    with ex:
        assert ex.execute(["tpai", "--cli", str(client_root / "gradient.png")]) == (
            0, "dry-run-output", ""
        )
        assert ex.is_available() is True
        assert ssh_children() == []
        info = ex.get_info()
        assert info["connected"] == "False"
        assert "mountpoint" not in info


def test_executor_env_vars_translated_and_only_context_forwarded(
    make_executor, client_root, monkeypatch
):
    models = client_root / "models"
    models.mkdir()
    (models / "model-weights.tz").write_bytes(b"weights")
    monkeypatch.setenv("TOPYAZ_API_TEST_SECRET", "must-not-travel")
    ex = make_executor(env_vars={"TVAI_MODEL_DIR": str(models), "PLAIN": "not a path"})
    code, out, err = ex.execute(
        ["sh", "-c", 'echo "$TVAI_MODEL_DIR"; ls "$TVAI_MODEL_DIR"; echo "[$PLAIN]"; '
                     'echo "[${TOPYAZ_API_TEST_SECRET-unset}]"']
    )
    assert code == 0, err
    lines = out.splitlines()
    mountpoint = ex.get_info()["mountpoint"]
    assert lines[0] == mountpoint + "/models"
    assert lines[1] == "model-weights.tz"
    assert lines[2] == "[not a path]"
    assert lines[3] == "[unset]"


def test_executor_input_data_reaches_stdin(make_executor):
    ex = make_executor()
    assert ex.execute(["cat"], input_data="line one\nline two ü\n") == (
        0, "line one\nline two ü\n", ""
    )
    # More than one protocol chunk (1 MiB) arrives whole and in order.
    data = "".join(f"{i:07d}\n" for i in range(300_000))  # 2.4 MB
    code, out, err = ex.execute(["sha256sum"], input_data=data)
    assert code == 0, err
    assert out.split()[0] == hashlib.sha256(data.encode()).hexdigest()
    # Without input_data the command reads an empty stdin (it does not hang).
    assert ex.execute(["cat"], timeout=20) == (0, "", "")


def test_executor_sequential_calls_reuse_one_session(make_executor, client_root):
    ex = make_executor()
    assert ssh_children() == []  # connecting is lazy
    assert ex.get_info()["connected"] == "False"
    seen = []
    for i in range(5):
        code, out, err = ex.execute(["pwd"])
        assert code == 0, err
        seen.append(out.strip())
        assert len(ssh_children()) == 1, f"call {i}: ssh children {ssh_children()}"
        assert ex.get_info()["connected"] == "True"
    assert len(set(seen)) == 1, seen
    assert seen[0] == ex.get_info()["mountpoint"]
    assert ex.get_info()["root"] == os.path.realpath(client_root)
    ex.close()
    assert wait_until(lambda: ssh_children() == [], 3)
    # Closing is not the end: the next call opens a new session.
    assert ex.execute(["true"])[0] == 0
    assert ex.get_info()["mountpoint"] != seen[0]


def test_executor_is_available_on_the_good_host(make_executor):
    ex = make_executor()
    assert ex.is_available() is True
    assert ex.get_info()["connected"] == "True"


@pytest.fixture
def wrong_key(tmp_path) -> Path:
    key = tmp_path / "not-authorized_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True, stdin=subprocess.DEVNULL)
    return key


NO_CONFIG_OPTIONS = (
    "StrictHostKeyChecking=no",
    "UserKnownHostsFile=/dev/null",
    "BatchMode=yes",
    "IdentitiesOnly=yes",
    "LogLevel=ERROR",
)


def test_executor_wrong_key_is_authentication_failed(make_executor, testhost, wrong_key):
    opts = RemoteOptions(
        host="127.0.0.1", user=REMOTE_USER, ssh_port=testhost.port, ssh_key=str(wrong_key),
        ssh_options=NO_CONFIG_OPTIONS, remote_python=testhost.remote_python,
        connection_timeout=10,
    )
    ex = make_executor(opts)
    assert ex.is_available() is False
    with pytest.raises(AuthenticationFailed, match="Permission denied"):
        ex.execute(["true"])
    assert ex.get_info()["connected"] == "False"


def test_executor_nothing_listening_is_connection_failed(make_executor, testhost):
    opts = RemoteOptions(
        host="127.0.0.1", user=REMOTE_USER, ssh_port=free_port(), ssh_options=NO_CONFIG_OPTIONS,
        remote_python=testhost.remote_python, connection_timeout=5,
    )
    ex = make_executor(opts)
    assert ex.is_available() is False
    with pytest.raises(ConnectionFailed) as info:
        ex.execute(["true"])
    assert not isinstance(info.value, AuthenticationFailed)
    assert "Connection refused" in str(info.value)


def test_executor_path_outside_root_is_refused(make_executor, tmp_path, client_root):
    outside = tmp_path / "outside.png"
    shutil.copy(client_root / "gradient.png", outside)
    ex = make_executor()
    with pytest.raises(TranslationError) as info:
        ex.execute(["tpai", "--cli", str(outside), "-o", str(client_root / "out")])
    assert str(outside) in str(info.value)
    assert not (client_root / "out").exists()
    # The session survives a refused command.
    assert ex.execute(["true"])[0] == 0


def test_executor_relative_paths_and_separate_root(testhost, client_root):
    """working_dir below the root: relative paths (even ../) stay as typed and work."""
    sub = client_root / "sub"
    sub.mkdir()
    ex = MountExecutor(remote_options(testhost), ExecutorContext(working_dir=str(sub)),
                       root=client_root)
    try:
        code, out, err = ex.execute(["tpai", "--cli", "../gradient.png", "-o", "out"])
        assert code == 0, err
        assert out == "Processing ../gradient.png -> out/gradient.png\n"
        assert (sub / "out" / "gradient.png").stat().st_size > 0
        assert ex.get_info()["root"] == os.path.realpath(client_root)
    finally:
        ex.close()


def test_executor_recovers_after_the_connection_is_lost(make_executor, testhost):
    ex = make_executor()
    assert ex.execute(["true"])[0] == 0
    (ssh,) = ssh_children()
    os.kill(ssh, signal.SIGKILL)  # the network goes away (our own ssh child, by pid)
    # A detachable session (the default grace) reconnects to the same mount; one that
    # ended with its link would be gone: either way the next command runs.
    available = ex.is_available()
    try:
        result = ex.execute(["echo", "back"])
    except ConnectionFailed:
        # Reporting the loss once is fine, but not after is_available() said all is well,
        # and the call after that must reconnect.
        assert not available, "is_available() was True, yet execute() failed"
        result = ex.execute(["echo", "back"])
    assert result == (0, "back\n", "")


def test_executor_output_not_committed_is_not_success(make_executor, client_root):
    """The job's output cannot be written on the client (its directory became a file)."""
    ex = make_executor()
    script = (
        "mkdir d; exec 3>d/out.txt; echo data >&3; touch marker; "
        "while [ ! -e go ]; do sleep 0.05; done; exec 3>&-"
    )
    outcome: dict[str, object] = {}

    def job() -> None:
        try:
            outcome["result"] = ex.execute(["sh", "-c", script], timeout=30)
        except BaseException as e:  # reported below
            outcome["error"] = e

    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert wait_until(lambda: (client_root / "marker").exists(), 20)
        shutil.rmtree(client_root / "d")
        (client_root / "d").write_text("a file now, not a directory")
    finally:
        (client_root / "go").touch()
        worker.join(60)
    assert not (client_root / "d").is_dir()
    error = outcome.get("error")
    if error is not None:
        assert isinstance(error, TopyazMountError), repr(error)  # raising is fine
        return
    code, out, err = outcome["result"]  # type: ignore[misc]
    kept = re.search(r"kept on the remote host at (\S+/kept/[0-9a-f]+)/", err)
    if kept:  # the bytes the client did not get; ours, remove them
        shutil.rmtree(kept.group(1), ignore_errors=True)
    assert "d/out.txt: not written on the client" in err
    assert code != 0, f"the output was lost, yet the status is 0; stderr: {err}"


# --------------------------------------------------------------------------- RemoteMount (sync)


def test_remote_mount_from_synchronous_code(testhost, client_root):
    src = client_root / "gradient.png"
    host = RemoteHost.parse(testhost.remote, ssh_config=str(testhost.ssh_config),
                            remote_python=testhost.remote_python)
    assert host == remote_host(testhost)
    with RemoteMount(host, client_root) as r:
        assert r.is_open
        result = r.run(["sha256sum", "gradient.png"])
        assert isinstance(result, CompletedRun)
        assert result.returncode == 0, result.stderr
        assert isinstance(result.stdout, bytes) and isinstance(result.stderr, bytes)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        assert result.stdout.split()[0].decode() == digest

        remote = r.to_remote(src)
        assert remote.endswith("/gradient.png") and not remote.startswith(str(client_root))
        assert r.to_local(remote) == str(src)
        assert r.to_remote(client_root) == remote.rsplit("/", 1)[0]
        with pytest.raises(ValueError):
            r.to_remote("/etc/hostname")
        with pytest.raises(ValueError):
            r.to_local("/etc/hostname")

        # cwd, env and input, and an output written back.
        (client_root / "sub").mkdir()
        result = r.run(["sh", "-c", 'cat > note.txt; echo "$WHERE"; pwd'],
                       cwd=client_root / "sub", env={"WHERE": str(client_root / "sub")},
                       input=b"from stdin\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().splitlines() == [r.to_remote(client_root / "sub")] * 2
        assert (client_root / "sub" / "note.txt").read_bytes() == b"from stdin\n"

        with pytest.raises(TranslationError, match="outside the root"):
            r.run(["cat", "/etc/hostname"])

        result = r.run(["sh", "-c", "exit 7"])
        assert (result.returncode, result.stdout, result.stderr) == (7, b"", b"")
        with pytest.raises(JobTimeout):
            r.run(["sleep", "63.5"], timeout=1)
    assert not r.is_open
    with pytest.raises(RuntimeError):
        r.run(["true"])
    r.close()  # again: harmless
    with r:  # a closed RemoteMount opens a new session
        assert r.run(["echo", "again"]).stdout == b"again\n"


def test_remote_mount_open_failure_raises_our_error(client_root):
    mount = RemoteMount(
        RemoteHost("127.0.0.1", user=REMOTE_USER, port=free_port(),
                   ssh_options=NO_CONFIG_OPTIONS, connection_timeout=5),
        client_root,
    )
    with pytest.raises(ConnectionFailed):
        mount.open()
    assert not mount.is_open
    mount.close()  # harmless


# --------------------------------------------------------------------------- open_remote (trio)


def test_open_remote_from_trio_code(testhost, client_root):
    streamed: list[bytes] = []

    async def main() -> tuple[CompletedRun, CompletedRun, str]:
        async with open_remote(remote_host(testhost), client_root) as r:
            cat = await r.run(["cat", "gradient.png"], on_stdout=streamed.append)
            echo = await r.run(["sh", "-c", "echo to-err >&2; cat"], input="hi\n")
            return cat, echo, r.mountpoint

    cat, echo, mountpoint = trio.run(main)
    want = (client_root / "gradient.png").read_bytes()
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == want
    assert b"".join(streamed) == want
    assert (echo.returncode, echo.stdout, echo.stderr) == (0, b"hi\n", b"to-err\n")
    assert wait_until(lambda: mountpoint not in testhost.remote_mounts(), 3)


def test_open_remote_concurrent_runs_are_serialized(testhost, client_root):
    """Two tasks sharing one session each get their own command's output."""

    async def main() -> list[CompletedRun]:
        results: list[CompletedRun] = [None, None]  # type: ignore[list-item]
        async with open_remote(remote_host(testhost), client_root) as r:

            async def one(i: int) -> None:
                results[i] = await r.run(["sh", "-c", f"sleep 0.3; echo task-{i}"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0)
                nursery.start_soon(one, 1)
        return results

    results = trio.run(main)
    assert [(x.returncode, x.stdout) for x in results] == [(0, b"task-0\n"), (0, b"task-1\n")]


def test_open_remote_auth_failure(testhost, client_root, wrong_key):
    async def main() -> None:
        host = RemoteHost("127.0.0.1", user=REMOTE_USER, port=testhost.port,
                          ssh_key=str(wrong_key), ssh_options=NO_CONFIG_OPTIONS,
                          remote_python=testhost.remote_python, connection_timeout=10)
        async with open_remote(host, client_root):
            pass  # pragma: no cover

    with pytest.raises(AuthenticationFailed):
        trio.run(main)


def test_open_remote_translation_error_caught_inside_keeps_the_session(testhost, client_root,
                                                                      tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")

    async def main() -> tuple[str, CompletedRun]:
        async with open_remote(remote_host(testhost), client_root) as r:
            try:
                await r.run(["cat", str(outside)])
            except TranslationError as e:
                message = str(e)
            else:  # pragma: no cover
                raise AssertionError("no TranslationError")
            return message, await r.run(["echo", "fine"])

    message, after = trio.run(main)
    assert str(outside) in message
    assert (after.returncode, after.stdout) == (0, b"fine\n")


def test_open_remote_lets_exceptions_from_the_body_through(testhost, client_root, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")

    async def translation() -> None:
        async with open_remote(remote_host(testhost), client_root) as r:
            await r.run(["cat", str(outside)])

    async def own_error() -> None:
        async with open_remote(remote_host(testhost), client_root):
            raise KeyError("the caller's own")

    with pytest.raises(TranslationError):
        trio.run(translation)
    with pytest.raises(KeyError):
        trio.run(own_error)


def test_open_remote_callback_error_surfaces_from_run(testhost, client_root):
    def callback(data: bytes) -> None:
        raise RuntimeError("callback failed")

    async def main() -> tuple[str, CompletedRun]:
        async with open_remote(remote_host(testhost), client_root) as r:
            try:
                await r.run(["echo", "x"], on_stdout=callback)
            except RuntimeError as e:
                message = str(e)
            else:  # pragma: no cover
                raise AssertionError("the callback's error was swallowed")
            return message, await r.run(["echo", "still usable"])

    message, after = trio.run(main)
    assert message == "callback failed"
    assert after.stdout == b"still usable\n"


# --------------------------------------------------------------------------- temp dirs


def test_temp_dir_outside_root_is_refused_inside_root_works(make_executor, client_root):
    ex = make_executor()
    outside = tempfile.mkdtemp(prefix="topyaz-api-test-")
    try:
        with pytest.raises(TranslationError, match="outside the root"):
            ex.execute(["tpai", "--cli", str(client_root / "gradient.png"), "-o", outside])
    finally:
        shutil.rmtree(outside, ignore_errors=True)
    inside = tempfile.mkdtemp(dir=client_root, prefix=".topyaz-")
    code, out, err = ex.execute(["tpai", "--cli", str(client_root / "gradient.png"), "-o",
                                 inside])
    assert code == 0, err
    assert (Path(inside) / "gradient.png").stat().st_size > 0


def test_public_errors_share_a_base():
    for cls in (AuthenticationFailed, ConnectionFailed, JobTimeout):
        assert issubclass(cls, TopyazMountError)
    assert issubclass(AuthenticationFailed, ConnectionFailed)
    assert issubclass(TranslationError, ValueError)


def test_changed_shows_a_file_made_here_between_commands_at_once(testhost, client_root):
    with RemoteMount(remote_host(testhost), client_root) as remote:
        assert remote.run(["ls"]).returncode == 0  # the remote has listed the root
        (client_root / "new.txt").write_text("fresh")
        remote.changed([client_root / "new.txt", "/elsewhere/ignored"])
        r = remote.run(["cat", "new.txt"])
        assert (r.returncode, r.stdout) == (0, b"fresh"), r.stderr
