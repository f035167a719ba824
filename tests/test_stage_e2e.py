"""End to end on both backends: the FUSE mount and the staged tree (issue 13).

The key jobs of tests/test_exec_e2e.py run on both (products byte-identical to a local
run, a batch, Unicode names, exit status, Ctrl-C); the rest checks what is the stage
backend's own: inputs copied over (warm ones moving no bytes), outputs going home
while the job runs, a job that writes into an input leaving the content store alone,
`--include`, sessions restaging local edits, and `auto` choosing to stage on a host
whose FUSE cannot be used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import blake3
import pytest
from e2e_util import (
    CLI,
    client_env,
    descendants,
    describe,
    no_fusermount_python,
    pid_alive,
    portable_agent_python,
    remote_home,
    run_exec,
    session_agent_pid,
    session_dirs,
    sessions_dir,
    start_exec,
    wait_until,
)
from test_exec_e2e import (
    FFMPEG_ARGS,
    UNICODE_NAME,
    digests,
    local_copy,
    no_leftovers,  # autouse: no mount, session dir or temp file left behind
    run_local,
    standin,
)
from test_session_e2e import MountedSession

from topyaz_mount import JobTimeout, RemoteHost, RemoteMount

pytestmark = pytest.mark.e2e

__all__ = ["local_copy", "no_leftovers"]  # fixtures, imported for the tests below

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_directory_batch_matches_local(testhost, client_root, local_copy, backend):
    for base in (client_root, local_copy):
        (base / "shots").mkdir()
        for name in ("gradient.png", "noise.jpg", UNICODE_NAME, "small.tiff"):
            shutil.copy2(base / name, base / "shots" / name)
    r = run_on(testhost, client_root, backend,
               "gigapixel", "--cli", "-i", "shots", "-o", client_root / "out" / "giga",
               "--scale", "2")
    assert r.returncode == 0, describe(r)
    run_local(*standin("gigapixel"), "--cli", "-i", "shots", "-o", "out/giga", "--scale", "2",
              cwd=local_copy)
    assert len(digests(client_root / "out" / "giga")) == 4
    assert digests(client_root) == digests(local_copy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_job_matches_local_ffmpeg(testhost, client_root, local_copy, backend):
    (client_root / "out").mkdir()
    r = run_on(testhost, client_root, backend, "ffmpeg", *FFMPEG_ARGS, "out/clip 2x.mp4")
    assert r.returncode == 0, describe(r)
    (local_copy / "out").mkdir()
    run_local("ffmpeg", *FFMPEG_ARGS, "out/clip 2x.mp4", cwd=local_copy)
    local = (local_copy / "out" / "clip 2x.mp4").read_bytes()
    assert len(local) > 1000
    assert (client_root / "out" / "clip 2x.mp4").read_bytes() == local


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "product, src, produced",
    [
        ("photo", "noise.jpg", "noise__photo_ai.jpg"),
        ("giga", "gradient.png", "gradient_iGigapixelAI.png"),
        ("video", "clip.mp4", "clip_iVideoAI.mp4"),
    ],
)
def test_products_match_local(testhost, client_root, local_copy, product, src, produced,
                              backend):
    r = run_on(testhost, client_root, backend, product, src, dashdash=False)
    assert r.returncode == 0, describe(r)
    run_local(*standin("topyaz"), product, src, cwd=local_copy)
    assert (client_root / produced).read_bytes() == (local_copy / produced).read_bytes()
    assert digests(client_root) == digests(local_copy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stdio_and_exit_status(testhost, client_root, backend):
    r = run_on(testhost, client_root, backend, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n"), describe(r)


@pytest.mark.parametrize("backend", [*BACKENDS, "stage-threads"])
def test_ctrl_c_ends_the_job_and_its_output_so_far_comes_home(testhost, client_root, backend,
                                                              tmp_path):
    python, options = None, ["--backend", backend]
    if backend == "stage-threads":  # and the agent's channel moved by threads (Windows'),
        # on the agent's own channel (no relay: Windows has no re-attach yet)
        python = portable_agent_python(testhost, tmp_path / "host")
        options = ["--backend", "stage", "--grace", "0"]
    script = "echo partial > part.txt; echo ready; exec sleep 60"
    with start_exec(testhost, client_root, "sh", "-c", script, remote_python=python,
                    options=options) as p:
        assert p.wait_for_stdout(b"ready\n", 30), (p.stdout, p.stderr)
        p.send_signal(signal.SIGINT)
        r = p.wait(30)
    assert r.returncode == 128 + signal.SIGINT, describe(r)
    assert (client_root / "part.txt").read_bytes() == b"partial\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_output_the_policy_refuses_is_reported_and_not_written(testhost, client_root,
                                                                  backend):
    before = digests(client_root)
    r = run_on(testhost, client_root, backend, "sh", "-c",
               "echo keep > fine.txt; echo x > .envrc || exit 3",
               options=["--stats=json"])
    assert r.returncode != 0, describe(r)
    assert not (client_root / ".envrc").exists()
    assert (client_root / "fine.txt").read_bytes() == b"keep\n"
    assert ".envrc" in r.stderr.decode(errors="replace")
    after = digests(client_root)
    del after["fine.txt"]
    assert after == before
    kept = remote_home() / ".cache" / "topyaz-mount" / "kept"
    shutil.rmtree(kept, ignore_errors=True)  # what the stage backend kept of the refused


# --------------------------------------------------------------------------- stage only


def test_warm_inputs_move_no_content_bytes(testhost, client_root):
    data = os.urandom(3 << 20)
    (client_root / "fresh.bin").write_bytes(data)
    argv = ("sha256sum", "fresh.bin")
    cold = run_on(testhost, client_root, "stage", *argv, options=["--stats=json"])
    assert cold.returncode == 0, describe(cold)
    assert stats_of(cold)["content_bytes_sent"] == len(data)
    warm = run_on(testhost, client_root, "stage", *argv, options=["--stats=json"])
    assert warm.returncode == 0, describe(warm)
    assert warm.stdout == cold.stdout
    assert stats_of(warm)["content_bytes_sent"] == 0
    assert stats_of(warm)["files_committed"] == 0


def test_a_job_appending_to_an_input_never_changes_what_the_store_gives(testhost, client_root):
    """Without reflinks (ext4 here) the store lends the object to the tree and takes
    it back at the session's end only if unchanged: one the job appended to is not
    taken back, so the store holds the old content or nothing, never the new bytes
    under the old hash. An input left alone goes back, and the next run moves none."""
    data = os.urandom(1 << 20)
    (client_root / "in.bin").write_bytes(data)
    untouched = os.urandom(1 << 20)
    (client_root / "other.bin").write_bytes(untouched)
    r = run_on(testhost, client_root, "stage", "sh", "-c", 'printf more >> "$0"',
               "in.bin", "other.bin")
    assert r.returncode == 0, describe(r)
    assert (client_root / "in.bin").read_bytes() == data + b"more"
    assert (client_root / "other.bin").read_bytes() == untouched
    objects = remote_home() / ".cache" / "topyaz-mount" / "objects"
    digest = blake3.blake3(data).hexdigest()
    obj = objects / digest[:2] / digest
    assert not obj.exists() or obj.read_bytes() == data
    digest = blake3.blake3(untouched).hexdigest()
    assert (objects / digest[:2] / digest).read_bytes() == untouched
    # A later job reading the old content gets the old bytes.
    (client_root / "again.bin").write_bytes(data)
    r = run_on(testhost, client_root, "stage", "sh", "-c", 'sha256sum < "$0"', "again.bin")
    assert r.returncode == 0, describe(r)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = run_on(testhost, client_root, "stage", "sha256sum", "other.bin",
               options=["--stats=json"])
    assert r.returncode == 0, describe(r)
    assert r.stdout.split()[0].decode() == hashlib.sha256(untouched).hexdigest()
    assert stats_of(r)["content_bytes_sent"] == 0


def test_outputs_become_store_objects_when_the_session_ends(testhost, client_root):
    """Moved, not copied, into the store as the tree goes: a later job reading one
    moves no content. One a process left behind still holds open for writing is not
    taken, and if the store held changed bytes, a later job would still read right."""
    r = run_on(testhost, client_root, "stage", "sh", "-c",
               "head -c 3000000 /dev/urandom > kept.bin")
    assert r.returncode == 0, describe(r)
    objects = remote_home() / ".cache" / "topyaz-mount" / "objects"
    data = (client_root / "kept.bin").read_bytes()
    digest = blake3.blake3(data).hexdigest()
    assert (objects / digest[:2] / digest).read_bytes() == data
    r = run_on(testhost, client_root, "stage", "sha256sum", "kept.bin",
               options=["--stats=json"])
    assert r.returncode == 0, describe(r)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert stats_of(r)["content_bytes_sent"] == 0

    # A process the job left behind keeps the output open and appends to it once
    # the session has ended.
    late = ("head -c 2000000 /dev/urandom > late.bin; "
            "setsid sh -c 'exec 3>>late.bin; : > opened; sleep 2; printf more >&3' "
            "> /dev/null 2>&1 & while [ ! -e opened ]; do sleep 0.05; done")
    r = run_on(testhost, client_root, "stage", "sh", "-c", late)
    assert r.returncode == 0, describe(r)
    committed = (client_root / "late.bin").read_bytes()
    assert len(committed) == 2000000
    digest = blake3.blake3(committed).hexdigest()
    obj = objects / digest[:2] / digest
    assert not obj.exists()  # held open for writing: not taken
    (client_root / "again.bin").write_bytes(committed)
    r = run_on(testhost, client_root, "stage", "sha256sum", "again.bin")
    assert r.returncode == 0, describe(r)
    assert r.stdout.split()[0].decode() == hashlib.sha256(committed).hexdigest()


def test_outputs_go_home_while_the_job_runs(testhost, client_root):
    script = "for i in 1 2 3; do echo $i > out$i.txt; done; echo ready; exec sleep 60"
    with start_exec(testhost, client_root, "sh", "-c", script,
                    options=["--backend", "stage"]) as p:
        assert p.wait_for_stdout(b"ready\n", 30), (p.stdout, p.stderr)
        arrived = wait_until(
            lambda: all((client_root / f"out{i}.txt").exists() for i in (1, 2, 3)), 30
        )
        still_running = p.proc.poll() is None
        p.send_signal(signal.SIGINT)
        r = p.wait(30)
    assert arrived and still_running, describe(r)
    for i in (1, 2, 3):
        assert (client_root / f"out{i}.txt").read_bytes() == f"{i}\n".encode()


def test_inputs_the_job_deletes_or_renames_stay_on_the_client(testhost, client_root):
    before = digests(client_root)
    r = run_on(testhost, client_root, "stage", "sh", "-c",
               "rm gradient.png && mv noise.jpg moved.jpg && mkdir -p made/empty",
               "gradient.png", "noise.jpg")
    assert r.returncode == 0, describe(r)
    assert (client_root / "made" / "empty").is_dir()  # new directories do travel
    after = digests(client_root)
    assert after.pop("moved.jpg") == before["noise.jpg"]
    assert after == before


def test_include_stages_what_no_argument_names(testhost, client_root):
    (client_root / "conf").mkdir()
    (client_root / "conf" / "model.cfg").write_text("weights=7\n")
    script = "cat conf/model.cfg"
    r = run_on(testhost, client_root, "stage", "sh", "-c", script)
    assert r.returncode != 0 and b"No such file" in r.stderr, describe(r)
    r = run_on(testhost, client_root, "stage", "sh", "-c", script,
               options=["--include", client_root / "conf"])
    assert (r.returncode, r.stdout) == (0, b"weights=7\n"), describe(r)


def test_the_tree_is_removed_when_the_session_ends(testhost, client_root):
    before = session_dirs()
    r = run_on(testhost, client_root, "stage", "sh", "-c", "echo x > made.txt; ls", "gradient.png")
    assert r.returncode == 0, describe(r)
    assert session_dirs() == before
    assert sessions_dir().is_dir()


def test_auto_stages_where_fuse_is_not_usable(testhost, client_root, tmp_path, local_copy):
    python = no_fusermount_python(testhost, tmp_path / "host")
    r = run_exec(testhost, client_root, "tpai", "--cli", "noise.jpg", "-o", "out",
                 remote_python=python, options=["-v", "--stats=json"])
    assert r.returncode == 0, describe(r)
    assert stats_of(r)["backend"] == "stage"
    assert b"FUSE is not usable on this host (fusermount3 is not installed" in r.stderr
    run_local(*standin("tpai"), "--cli", "noise.jpg", "-o", "out", cwd=local_copy)
    assert digests(client_root) == digests(local_copy)
    # Asked for explicitly, FUSE fails as before: one line naming the cause.
    r = run_exec(testhost, client_root, "true", remote_python=python,
                 options=["--backend", "fuse"])
    assert r.returncode == 255 and b"fusermount3" in r.stderr, describe(r)


# --------------------------------------------------------------------------- sessions, API


class StagedSession(MountedSession):
    def mount_argv(self, *extra: str) -> list[str]:
        return super().mount_argv("--backend", "stage", *extra)


@pytest.fixture
def staged_session(testhost, client_root, tmp_path):
    s = StagedSession(testhost, client_root, tmp_path / "runtime", "staged")
    try:
        yield s.start()
    finally:
        s.close()


def test_a_staged_session_restages_a_local_edit_and_commits_outputs(staged_session):
    s = staged_session
    root = s.root
    assert s.status()["backend"] == "stage"
    (root / "input.txt").write_bytes(b"version one\n")
    assert wait_until(lambda: s.status()["invalidated_paths"] >= 1, 30)
    r = s.exec("sh", "-c", 'cat "$0" > copy1.txt', "input.txt")
    assert r.returncode == 0, describe(r)
    assert (root / "copy1.txt").read_bytes() == b"version one\n"
    # Same size, same mtime: only the watcher's invalidation can tell the agent.
    seen = s.status()["invalidated_paths"]
    st = (root / "input.txt").stat()
    (root / "input.txt").write_bytes(b"version two\n")
    os.utime(root / "input.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert wait_until(lambda: s.status()["invalidated_paths"] > seen, 30)
    r = s.exec("sh", "-c", 'cat "$0"; cat copy1.txt', "input.txt")
    assert (r.returncode, r.stdout) == (0, b"version two\nversion one\n"), describe(r)
    # An output of one command is an input of the next without a transfer.
    r = s.exec("cat", "copy1.txt")
    assert r.stdout == b"version one\n", describe(r)
    assert (root / "input.txt").read_bytes() == b"version two\n"
    # Two commands at once: each one's outputs are home when it reports.
    with s.start_exec("sh", "-c", "echo a1 > a1.txt; echo ready; sleep 3; echo a2 > a2.txt") as p:
        assert p.wait_for_stdout(b"ready\n", 30), (p.stdout, p.stderr)
        r = s.exec("sh", "-c", "echo b > b.txt")
        assert r.returncode == 0 and (root / "b.txt").read_bytes() == b"b\n", describe(r)
        r = p.wait(30)
    assert r.returncode == 0, describe(r)
    assert [(root / n).read_bytes() for n in ("a1.txt", "a2.txt")] == [b"a1\n", b"a2\n"]
    r = s.unmount()
    assert r.returncode == 0, describe(r)


def test_python_api_on_the_stage_backend(testhost, client_root, local_copy):
    host = RemoteHost.parse(testhost.remote, ssh_config=str(testhost.ssh_config),
                            remote_python=testhost.remote_python, backend="stage")
    with RemoteMount(host, client_root) as remote:
        result = remote.run(["tpai", "--cli", "gradient.png", "-o", "out"])
        assert result.returncode == 0, result.stderr
        assert result.stats["backend"] == "stage"
        result = remote.run(["sh", "-c", "exit 5"])
        assert result.returncode == 5
        with pytest.raises(JobTimeout):
            remote.run(["sleep", "63.5"], timeout=1)
    run_local(*standin("tpai"), "--cli", "gradient.png", "-o", "out", cwd=local_copy)
    assert digests(client_root) == digests(local_copy)


def test_doctor_says_auto_stages_where_fuse_is_not_usable(testhost, tmp_path):
    python = no_fusermount_python(testhost, tmp_path / "host")

    def doctor(*extra: str) -> subprocess.CompletedProcess:
        argv = [*CLI, "doctor", "--remote", testhost.remote, "-F", str(testhost.ssh_config),
                "--remote-python", python, *extra]
        return subprocess.run(argv, env=client_env(), capture_output=True, text=True,
                              timeout=60)

    r = doctor()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok   fuse: fusermount3 is not installed" in r.stdout
    assert "auto stages files instead" in r.stdout
    assert "ok   backend: stage (asked for: auto)" in r.stdout
    r = doctor("--backend", "fuse")
    assert r.returncode == 255, r.stdout + r.stderr
    assert "FAIL fuse: fusermount3 is not installed" in r.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_remote_command_exits_127(testhost, client_root, backend):
    r = run_on(testhost, client_root, backend, "no-such-command-xyz", "gradient.png")
    assert r.returncode == 127, describe(r)
    assert b"no-such-command-xyz" in r.stderr and b"Traceback" not in r.stderr


STILL_WRITING = r"""
import time
done = open("done.txt", "w"); done.write("whole\n"); done.close()
f = open("late.txt", "w"); f.write("partial"); f.flush()
print("ready", flush=True)
time.sleep(60)
"""


def test_a_lost_client_leaves_staged_outputs_kept_and_marked(testhost, client_root):
    before = session_dirs()
    with start_exec(testhost, client_root, "python3", "-c", STILL_WRITING,
                    options=["--backend", "stage", "--grace", "0"]) as p:
        assert p.wait_for_stdout(b"ready\n", 30), (p.stdout, p.stderr)
        assert wait_until(lambda: (client_root / "done.txt").exists(), 30)
        (session,) = [s for s in session_dirs() - before
                      if session_agent_pid(s) in descendants(testhost.pid)]
        agent = session_agent_pid(session)
        p.remember_ssh()
        p.send_signal(signal.SIGKILL)
        p.proc.wait(10)
        assert wait_until(lambda: not pid_alive(agent) and not os.path.exists(session), 30)
    kept = remote_home() / ".cache" / "topyaz-mount" / "kept" / Path(session).name
    try:
        manifest = json.loads((kept / "manifest.json").read_text())
        entries = {e["path"]: e for e in manifest["files"]}
        # done.txt only if its commit's reply was still on the way when the link went
        # (it is home already, and kept whole, as any commit that ended unheard).
        assert set(entries) - {"done.txt"} == {"late.txt"}
        assert entries["late.txt"]["complete"] is False
        if "done.txt" in entries:
            assert entries["done.txt"]["complete"] is True
            assert (kept / "files" / "done.txt").read_bytes() == b"whole\n"
        assert (kept / "files" / "late.txt").read_bytes() == b"partial"
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    assert (client_root / "done.txt").read_bytes() == b"whole\n"
    assert not (client_root / "late.txt").exists()


def test_a_script_in_the_root_runs_staged_cold_and_warm(testhost, client_root):
    script = client_root / "tools" / "run.sh"
    script.parent.mkdir()
    script.write_text('#!/bin/sh\necho "ran with $1"\n')
    script.chmod(0o755)
    for _ in range(2):  # the second time its content comes from the store
        r = run_on(testhost, client_root, "stage", "./tools/run.sh", "gradient.png")
        assert (r.returncode, r.stdout) == (0, b"ran with gradient.png\n"), describe(r)
    assert script.stat().st_mode & 0o777 == 0o755


def test_a_channel_moved_by_threads_carries_a_job_both_ways(testhost, client_root, tmp_path):
    """The agent's ssh channel moved by threads, as on a Windows host: an input of many
    chunks goes out, twice its size comes home, and stdin, stdout, stderr and the exit
    status travel as on the other channel."""
    python = portable_agent_python(testhost, tmp_path / "host")
    data = os.urandom(3 << 20)
    (client_root / "in.bin").write_bytes(data)
    r = run_on(testhost, client_root, "stage", "sh", "-c",
               "cat in.bin in.bin > out.bin && head -c 100000 in.bin && cat >&2; exit 5",
               options=["-v", "--grace", "0", "--stdin", "--include", "in.bin"],
               remote_python=python,
               stdin_data=b"typed\n")
    assert r.returncode == 5, describe(r)
    assert b"the ssh channel moves by threads" in r.stderr, describe(r)
    assert r.stdout == data[:100000], describe(r)
    assert b"typed\n" in r.stderr
    assert (client_root / "out.bin").read_bytes() == data + data
    assert (client_root / "in.bin").read_bytes() == data


ORPHAN_APPENDS = """
import os, sys, time
data = os.urandom(30 << 20)
with open("r.bin", "wb") as f:
    f.write(data)
print(__import__("hashlib").sha256(data).hexdigest(), flush=True)
if os.fork() == 0:  # outlives the job, and changes its output while it goes home
    os.setsid()  # out of the job's process group, which ends with the job
    time.sleep(0.5)
    with open("r.bin", "ab") as f:
        f.write(b"tail")
    os._exit(0)
"""


def test_an_output_changed_while_it_goes_home_lands_whole(testhost, client_root, tmp_path):
    """Once the job has ended, the stage backend sends its outputs from the tree without
    a copy; a process the job left behind appends to one while it is on the (slow)
    link. What lands is one version of the file, whole, never a mix of two."""
    from bench_wan import start_proxy, stop_proxy

    before = sorted(os.listdir(client_root))
    proxy, port = start_proxy(testhost.port, 10, 80, tmp_path / "wanproxy.log")
    try:
        r = run_exec(testhost, client_root, "python3", "-c", ORPHAN_APPENDS,
                     remote=f"{testhost.remote_user}@127.0.0.1:{port}",
                     options=["--backend", "stage"])  # fmt: skip
    finally:
        stop_proxy(proxy)
    assert r.returncode == 0, describe(r)
    first = r.stdout.decode().split()[0]
    landed = (client_root / "r.bin").read_bytes()
    whole_first = hashlib.sha256(landed).hexdigest() == first
    whole_second = landed.endswith(b"tail") and hashlib.sha256(landed[:-4]).hexdigest() == first
    assert whole_first or whole_second, f"{len(landed)} bytes: neither version of the file"
    assert sorted(os.listdir(client_root)) == sorted([*before, "r.bin"])  # no temp file
