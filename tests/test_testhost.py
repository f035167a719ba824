"""Fast checks of the local test host and the stand-in Topaz CLIs."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import testhost as testhost_mod  # tools/ is put on sys.path by conftest.py

STANDINS_DIR = Path(__file__).resolve().parent.parent / "tools" / "standins"


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run_standins_locally(samples: Path, work: Path) -> None:
    """Run each stand-in over a copy of the samples in work/."""
    py = sys.executable
    shutil.copytree(samples, work / "in")
    (work / "out").mkdir()
    cmds = [
        [py, STANDINS_DIR / "tpai", "--cli", work / "in", "-o", work / "out/tpai"],
        [py, STANDINS_DIR / "tpai", work / "in/gradient.png", "-o", work / "out/tpai-jpg",
         "--format", "jpg", "--scale", "3"],
        [py, STANDINS_DIR / "gigapixel", "--cli", "-i", work / "in", "-o", work / "out/giga"],
        [py, STANDINS_DIR / "topyaz", "photo", work / "in/noise.jpg"],
        [py, STANDINS_DIR / "topyaz", "giga", work / "in/gradient.png"],
        [py, STANDINS_DIR / "topyaz", "video", work / "in/clip.mp4"],
    ]
    for argv in cmds:
        subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def test_ssh_runs_as_remote_user(testhost):
    r = testhost.run("id -un")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == testhost_mod.REMOTE_USER
    # The argv form and the -o options form reach the same host.
    opts = subprocess.run(
        ["ssh", *testhost.ssh_options, "127.0.0.1", "id -un"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30,
    )
    assert opts.stdout.strip() == testhost_mod.REMOTE_USER, opts.stderr


def test_remote_path_resolves_tools(testhost):
    r = testhost.run("command -v tpai gigapixel topyaz ffmpeg python3")
    assert r.returncode == 0, r.stdout + r.stderr
    found = r.stdout.split()
    bin_dir = str(testhost_mod.BIN_DIR)
    assert found == [f"{bin_dir}/tpai", f"{bin_dir}/gigapixel", f"{bin_dir}/topyaz",
                     "/usr/bin/ffmpeg", f"{testhost_mod.VENV_DIR}/bin/python3"]


def test_remote_venv_imports(testhost):
    r = testhost.run(
        f"{shlex.quote(testhost.remote_python)} -c "
        "'import pyfuse3, trio, msgspec, blake3, platformdirs, PIL; print(\"ok\")'"
    )
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


def test_remote_user_cannot_read_client_root(testhost, client_root):
    target = client_root / "gradient.png"
    assert target.is_file()
    r = testhost.run(f"cat {shlex.quote(str(target))} > /dev/null")
    assert r.returncode != 0
    assert "Permission denied" in r.stderr
    r = testhost.run(f"ls {shlex.quote(str(client_root))}")
    assert r.returncode != 0


FUSE_CHECK = r"""
import os, sys, tempfile
import pyfuse3, trio

class Ops(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.st_mode, e.st_nlink = inode, 0o40755, 2
        e.st_uid, e.st_gid = os.getuid(), os.getgid()
        return e

mnt = tempfile.mkdtemp(prefix="fusecheck ", dir=os.path.expanduser("~"))
pyfuse3.init(Ops(), mnt, set(pyfuse3.default_options) | {"fsname=fusecheck"})

async def main():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        print("MOUNTED", mnt, flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        pyfuse3.terminate()

trio.run(main)
pyfuse3.close(unmount=True)
os.rmdir(mnt)
print("UNMOUNTED", flush=True)
"""


def test_remote_user_can_fuse_mount(testhost):
    """tmremote can mount FUSE (via /dev/fuse + fusermount3) and remote_mounts() sees it."""
    proc = subprocess.Popen(
        [*testhost.ssh_argv(), f"python3 -c {shlex.quote(FUSE_CHECK)}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("MOUNTED "):
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"remote FUSE mount failed: {line!r}\n{err}")
        mnt = line.split(" ", 1)[1].rstrip("\n")
        assert mnt in testhost.remote_mounts()
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "UNMOUNTED" in out
        assert mnt not in testhost.remote_mounts()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_standins_are_deterministic_locally(samples_dir, tmp_path):
    for run in ("a", "b"):
        _run_standins_locally(samples_dir, tmp_path / run)
    first, second = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert first == second
    names = set(first)
    assert "out/tpai/Café photo – 写真 01.png" in names
    assert "out/tpai-jpg/gradient.jpg" in names
    assert "out/giga/noise.jpg" in names
    assert {"in/noise__photo_ai.jpg", "in/gradient_iGigapixelAI.png",
            "in/clip_iVideoAI.mp4"} <= names


def test_standins_remote_output_matches_local(testhost, samples_dir, tmp_path):
    """The remote venv's Pillow/ffmpeg give the same bytes as the local interpreter."""
    _run_standins_locally(samples_dir, tmp_path / "local")
    # A directory tmremote can write to; cleaned up by root afterwards.
    shared = Path(tempfile.mkdtemp(prefix="topyaz-testhost-shared-"))
    try:
        os.chmod(shared, 0o777)
        shutil.copytree(samples_dir, shared / "in")
        os.chmod(shared / "in", 0o777)
        (shared / "out").mkdir(mode=0o777)
        os.chmod(shared / "out", 0o777)
        s = shlex.quote(str(shared))
        script = " && ".join([
            f"tpai --cli {s}/in -o {s}/out/tpai",
            f"tpai {s}/in/gradient.png -o {s}/out/tpai-jpg --format jpg --scale 3",
            f"gigapixel --cli -i {s}/in -o {s}/out/giga",
            f"topyaz photo {s}/in/noise.jpg",
            f"topyaz giga {s}/in/gradient.png",
            f"topyaz video {s}/in/clip.mp4",
        ])
        r = testhost.run(script, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert _digests(shared) == _digests(tmp_path / "local")
    finally:
        shutil.rmtree(shared, ignore_errors=True)
