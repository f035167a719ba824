"""setup's client side: the own wheel, the host's requirements and platform tags."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from topyaz_mount import __version__
from topyaz_mount.client.hostsetup import (
    HostFacts,
    SetupFailed,
    build_requires,
    gather,
    host_requirements,
    own_wheel,
)
from topyaz_mount.client.transport import Remote, SshSettings


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A wheel cache of the test's own (own_wheel builds this checkout's wheel there)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "own-cache"))


def facts(sys_platform: str, python: str, libc: str = "glibc 2.31") -> HostFacts:
    return HostFacts({
        "platform": "linux-x86_64" if sys_platform == "linux" else "macosx-14.0-arm64",
        "libc": libc,
        "markers": {
            "implementation_name": "cpython", "os_name": "posix",
            "platform_machine": "x86_64", "platform_system": "Linux",
            "python_version": python, "python_full_version": python + ".0",
            "sys_platform": sys_platform, "platform_python_implementation": "CPython",
            "implementation_version": python + ".0", "platform_release": "",
            "platform_version": "",
        },
    })


def test_host_requirements_follow_the_hosts_markers(own_cache):
    wheel = own_wheel()

    def names(host: HostFacts) -> set[str]:
        return {Requirement(r).name for r in host_requirements(wheel, host)}

    assert {"pyfuse3", "trio", "tomli"} <= names(facts("linux", "3.10"))
    mac = names(facts("darwin", "3.12"))
    assert "pyfuse3" not in mac and "tomli" not in mac and "trio" in mac


def test_pip_platforms_widen_manylinux():
    tags = facts("linux", "3.11", "glibc 2.28").pip_platforms()
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "linux_x86_64"
    assert "manylinux2014_x86_64" in tags and "manylinux_2_17_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags


def test_an_installed_wheel_is_repacked_file_for_file(tmp_path, own_cache):
    """A client installed from a wheel (pipx) has no source tree: it packs what it has."""
    wheel = own_wheel()
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
         "--disable-pip-version-check", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    code = "from topyaz_mount.client.hostsetup import own_wheel; print(own_wheel())"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    repacked = Path(out)
    assert repacked.parent == tmp_path / "cache" / "topyaz-mount" / "wheels"
    assert repacked.name == wheel.name

    def contents(path: Path) -> dict[str, bytes]:
        with zipfile.ZipFile(path) as zf:
            return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/RECORD")}

    assert contents(repacked) == contents(wheel)
    with zipfile.ZipFile(repacked) as zf:
        record = zf.read(next(n for n in zf.namelist() if n.endswith("/RECORD"))).decode()
    assert len(record.splitlines()) == len(contents(wheel)) + 1


def test_build_requires_of_an_sdist(tmp_path):
    """Offline, the host builds a source-only package in isolation from uploaded wheels."""
    src = tmp_path / "pkg-1.0"
    src.mkdir()
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=78.1.1", "Cython"]\n'
    )
    (src / "sub").mkdir()
    (src / "sub" / "pyproject.toml").write_text('[build-system]\nrequires = ["decoy"]\n')
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="pkg-1.0")
    assert build_requires(sdist) == ["setuptools>=78.1.1", "Cython"]
    (src / "pyproject.toml").unlink()
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="pkg-1.0")
    assert build_requires(sdist) == ["setuptools>=40.8", "wheel"]


def test_a_host_that_cannot_compile_pyfuse3_is_told_the_fix(tmp_path, own_cache):
    """Another Python than this one (no wheel built here helps) and no build tools."""
    host = facts("linux", "3.10")
    host.raw.update(abi="cp310", compiler=False, python_headers=True, pkg_config=True,
                    fuse3_headers=False, apt=True)
    settings = SshSettings(Remote("gpu"))
    with pytest.raises(SetupFailed) as info:
        gather(settings, host, own_wheel(), True, tmp_path)
    message = str(info.value)
    assert "pyfuse3 must be compiled on gpu" in message
    assert "lacks a C compiler, the libfuse3 headers" in message
    assert "run `apt-get install gcc python3-dev pkg-config libfuse3-dev` there" in message
    host.raw.update(apt=False, dnf=True)
    with pytest.raises(SetupFailed, match="dnf install gcc python3-devel pkgconf fuse3-devel"):
        gather(settings, host, own_wheel(), False, tmp_path)


def test_a_stage_host_needs_no_pyfuse3_and_no_compiler(tmp_path, own_cache):
    """The same host that cannot compile pyfuse3, set up for the stage backend: nothing
    to build, and pyfuse3 is not among its requirements."""
    host = facts("linux", "3.10")
    host.raw.update(abi="cp310", compiler=False, fuse3_headers=False, apt=True)
    assert "pyfuse3" not in {Requirement(r).name for r in host_requirements(own_wheel(), host, "")}
    notes = gather(SshSettings(Remote("gpu")), host, own_wheel(), True, tmp_path, "stage")
    assert notes == [f"its own wheel {own_wheel().name}"]


@pytest.mark.parametrize(
    ("problem", "asked", "chosen"),
    [
        (None, None, ("fuse", None)),
        (None, "auto", ("fuse", None)),
        (None, "stage", ("stage", None)),
        ("fusermount3 is not installed", None, ("stage", "fusermount3 is not installed")),
        ("fusermount3 is not installed", "auto", ("stage", "fusermount3 is not installed")),
        ("no /dev/fuse", "stage", ("stage", None)),
    ],
)
def test_the_backend_setup_installs_for(problem, asked, chosen):
    host = facts("linux", "3.11")
    host.raw["fuse_problem"] = problem
    assert host.backend_for(asked) == chosen


def test_asking_for_fuse_where_it_is_unusable_is_one_line():
    host = facts("darwin", "3.12")
    host.raw["fuse_problem"] = "FUSE mounts are supported on Linux only (this host is darwin)"
    with pytest.raises(SetupFailed) as info:
        host.backend_for("fuse")
    assert str(info.value) == (
        "FUSE is not usable on the host: FUSE mounts are supported on Linux only "
        "(this host is darwin)"
    )


def test_a_venv_made_for_stage_is_not_ready_for_fuse():
    host = facts("linux", "3.11")
    host.raw["ready"] = {"version": __version__, "wheel": "h", "backend": "stage"}
    assert host.ready_for("h", "stage") and not host.ready_for("h", "fuse")
    host.raw["ready"] = {"version": __version__, "wheel": "h"}  # made before backends
    assert host.ready_for("h", "fuse") and not host.ready_for("h", "stage")


def test_the_probe_runs_hostdirs_and_fusecheck():
    """The probe (run here on this machine's Python) puts the venv where hostdirs says
    and judges FUSE as the agent's ``auto`` does."""
    import json

    from topyaz_mount.agent import fusecheck, hostdirs
    from topyaz_mount.client.hostsetup import _PROBE

    r = subprocess.run(
        [sys.executable, "-c", _PROBE, __version__], capture_output=True, text=True, check=True
    )
    found = json.loads(r.stdout)
    assert found["venv"] == os.path.join(hostdirs.data_dir(), f"venv-{__version__}")
    assert found["fuse_problem"] == fusecheck.fuse_problem()
