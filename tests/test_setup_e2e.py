"""`topyaz-mount setup` against the test host (real sshd, real pip, real venv).

One setup is shared by the module (a venv and a pip install cost tens of seconds): made
online (the remote user's pip reaches the same indexes as this machine's), then used by
`exec` with no --remote-python and no -F, from the profile alone. The offline test runs
last: it gives the remote user a pip config that reaches no index, removes the venv and
sets up again from wheels this client uploads. Every venv made here is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_util import (
    CLI,
    REMOTE_USER,
    STANDINS_DIR,
    client_env,
    describe,
    no_fusermount_python,
    remote_home,
)

from topyaz_mount import __version__
from topyaz_mount.client.transport import Remote, SshSettings, explain_startup_failure

pytestmark = pytest.mark.e2e

IMAGE = "gradient.png"


def data_dir() -> Path:
    return remote_home() / ".local" / "share" / "topyaz-mount"


def venv_dir() -> Path:
    return data_dir() / f"venv-{__version__}"


def cli(config: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The CLI with this module's config file, and its wheel cache beside it."""
    env = {
        **client_env(),
        "TOPYAZ_MOUNT_CONFIG": str(config),
        "XDG_CACHE_HOME": str(config.parent / "cache"),
    }
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd="/"
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    return lines[0]


@pytest.fixture(scope="module")
def host_setup(testhost, tmp_path_factory):
    """setup --remote (online) once; yields (testhost, config path, setup's output)."""
    config = tmp_path_factory.mktemp("config") / "config.toml"
    shutil.rmtree(venv_dir(), ignore_errors=True)
    try:
        r = cli(config, "setup", "--remote", testhost.remote, "-F", str(testhost.ssh_config))
        assert r.returncode == 0, r.stdout + r.stderr
        add_user_keys(config, testhost.remote)
        yield testhost, config, r.stdout
    finally:
        shutil.rmtree(venv_dir(), ignore_errors=True)
        try:
            data_dir().rmdir()
        except OSError:
            pass


def tpai_job(testhost, config: Path, root: Path, *options: str) -> subprocess.CompletedProcess:
    """`exec photo` (the profile maps photo to the stand-in tpai), no --remote-python."""
    env = {**client_env(), "TOPYAZ_MOUNT_CONFIG": str(config)}
    argv = [*CLI, "exec", "--remote", testhost.remote, *options, "--root", str(root),
            "photo", IMAGE, "-o", "out"]
    return subprocess.run(argv, env=env, cwd=root, capture_output=True, timeout=120)


def assert_matches_local(root: Path, local: Path) -> None:
    subprocess.run([sys.executable, str(STANDINS_DIR / "tpai"), "--cli", IMAGE, "-o", "out"],
                   cwd=local, check=True, capture_output=True, timeout=120)
    produced = sorted(p.name for p in (root / "out").iterdir())
    assert produced == sorted(p.name for p in (local / "out").iterdir()) == [IMAGE]
    assert (root / "out" / IMAGE).read_bytes() == (local / "out" / IMAGE).read_bytes()


def add_user_keys(config: Path, host: str) -> None:
    """What a user adds by hand: a product command in the host's table, another section."""
    text = config.read_text()
    assert f'[hosts."{host}"]' in text
    text = text.replace(f'[hosts."{host}"]\n', f'[hosts."{host}"]\nphoto_cmd = "tpai --cli"\n')
    config.write_text("# mine\n[other]\nkeep = 1  # me too\n\n" + text)


def test_setup_online_then_exec_from_the_profile(host_setup, client_root, tmp_path, samples_dir):
    testhost, config, out = host_setup
    assert "its pip reaches a package index" in out
    assert f"installed topyaz-mount {__version__} (online) in " in out
    assert "profile written" in out
    assert (venv_dir() / ".topyaz-mount-ready").is_file()
    r = tpai_job(testhost, config, client_root)
    assert r.returncode == 0, describe(r)
    local = tmp_path / "local"
    shutil.copytree(samples_dir, local)
    assert_matches_local(client_root, local)


def test_setup_again_does_nothing(host_setup):
    testhost, config, _ = host_setup
    before = config.read_bytes()
    r = cli(config, "setup", "--remote", testhost.remote)  # -F comes from the profile
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is set up already" in r.stdout and "nothing to do" in r.stdout
    assert "profile written" not in r.stdout and "installed" not in r.stdout
    assert config.read_bytes() == before
    r = cli(config, "setup", "--remote", testhost.remote, "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"topyaz-mount {__version__} is set up in {venv_dir()}" in r.stdout
    # Given the venv's own python (say, TOPYAZ_MOUNT_REMOTE_PYTHON set for exec), setup
    # would make the venv from the interpreter it is about to remove: it takes the base.
    venv_python = f"{venv_dir()}/bin/python"
    r = cli(config, "setup", "--remote", testhost.remote, "--check",
            "--remote-python", venv_python)
    assert r.returncode == 0, r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert " at /" in first and str(venv_dir()) not in first


def test_doctor_shows_the_setup(host_setup):
    testhost, config, _ = host_setup
    r = cli(config, "doctor", "--remote", testhost.remote)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'[hosts."{testhost.remote}"]' in r.stdout
    assert f"ok   setup: topyaz-mount {__version__} in {venv_dir()}" in r.stdout
    assert f"ok   agent: {venv_dir()}/bin/python" in r.stdout
    assert f"ok   topyaz-mount: {__version__} (the client is {__version__})" in r.stdout


def test_never_set_up_names_setup(host_setup, client_root):
    testhost, config, _ = host_setup
    r = tpai_job(testhost, config, client_root, "--remote-python", "/usr/bin/python3")
    line = r.stderr.decode()
    assert r.returncode == 255, describe(r)
    assert line.count("\n") == 1 and "Traceback" not in line
    assert f"run `topyaz-mount setup --remote {testhost.remote}`" in line
    assert not (client_root / "out").exists()


def test_version_skew_is_one_line_with_both_versions(host_setup, client_root):
    """The host's venv claims another version: exec refuses with the fix, doctor says so."""
    testhost, config, _ = host_setup
    init = next(venv_dir().glob("lib/python3*/site-packages/topyaz_mount/__init__.py"))
    original = init.read_bytes()
    try:
        init.write_bytes(original.replace(f'"{__version__}"'.encode(), b'"0.0.1"'))
        r = tpai_job(testhost, config, client_root)
        assert r.returncode == 255, describe(r)
        line = one_error_line(subprocess.CompletedProcess([], 255, "", r.stderr.decode()))
        assert f"topyaz-mount on {testhost.remote} is 0.0.1, this client is {__version__}" in line
        assert f"`topyaz-mount setup --remote {testhost.remote}`" in line
        assert not (client_root / "out").exists()
        r = cli(config, "doctor", "--remote", testhost.remote)
        assert r.returncode == 255
        assert f"FAIL topyaz-mount: 0.0.1 (the client is {__version__})" in r.stdout
    finally:
        init.write_bytes(original)


def test_skew_message_for_an_agent_older_than_the_flag():
    settings = SshSettings(Remote("gpu"), remote_python="/opt/v/bin/python")
    tail = ["usage: python -m topyaz_mount.agent [-h] ...",
            "python -m topyaz_mount.agent: error: unrecognized arguments: --client-version 0.1.0"]
    e = explain_startup_failure(settings, tail)
    assert f"older than this client ({__version__})" in str(e)
    assert "run `topyaz-mount setup --remote gpu`" in str(e)


@pytest.fixture
def no_index_for_the_remote_user():
    """A pip config for the remote user that reaches no index (undone afterwards).

    pip merges the global files (/etc/pip.conf, /etc/xdg/pip/pip.conf: here cert and
    constraint only) with the user's; the user's file sets every key that could name
    a source: index-url to a closed port, no extra index, no find-links.
    """
    pip_dir = remote_home() / ".config" / "pip"
    made = [p for p in (pip_dir.parent, pip_dir) if not p.exists()]
    conf = pip_dir / "pip.conf"
    assert not conf.exists(), f"{conf} exists already; not overwriting it"
    pip_dir.mkdir(parents=True, exist_ok=True)
    conf.write_text("[global]\nindex-url = http://127.0.0.1:9/simple\nextra-index-url =\n"
                    "find-links =\nretries = 0\ntimeout = 5\n")
    for p in made:
        shutil.chown(p, REMOTE_USER, REMOTE_USER)
    try:
        yield
    finally:
        conf.unlink()
        for p in reversed(made):
            p.rmdir()


def test_setup_offline_uploads_the_wheels(
    host_setup, no_index_for_the_remote_user, client_root, tmp_path, samples_dir
):
    testhost, config, _ = host_setup
    shutil.rmtree(venv_dir())
    r = cli(config, "setup", "--remote", testhost.remote, "--check")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "is not set up" in r.stdout and f"topyaz-mount setup --remote {testhost.remote}" in \
        r.stdout
    assert not venv_dir().exists()  # --check changed nothing
    r = cli(config, "setup", "--remote", testhost.remote)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reaches no package index" in r.stdout
    assert "pyfuse3 built here" in r.stdout and "wheels downloaded for manylinux" in r.stdout
    assert f"installed topyaz-mount {__version__} (offline) in " in r.stdout
    r = tpai_job(testhost, config, client_root)
    assert r.returncode == 0, describe(r)
    local = tmp_path / "local"
    shutil.copytree(samples_dir, local)
    assert_matches_local(client_root, local)
    assert os.path.isfile(venv_dir() / ".topyaz-mount-ready")


def test_setup_where_fuse_is_not_usable_installs_without_pyfuse3(
    host_setup, client_root, tmp_path, samples_dir
):
    """A remote Python whose PATH lacks fusermount3: setup says so in one line, makes
    the venv without pyfuse3 and records the stage backend; exec then stages."""
    testhost, config, _ = host_setup
    python = no_fusermount_python(testhost, tmp_path / "host")
    shutil.rmtree(venv_dir())
    r = cli(config, "setup", "--remote", testhost.remote, "--remote-python", python)
    assert r.returncode == 0, r.stdout + r.stderr
    said = [x for x in r.stdout.splitlines() if "without pyfuse3" in x]
    assert len(said) == 1 and "fusermount3 is not installed" in said[0], r.stdout
    assert 'backend = "stage"' in config.read_text()
    assert (venv_dir() / ".topyaz-mount-ready").is_file()
    assert not list(venv_dir().glob("lib/python3*/site-packages/pyfuse3*"))
    r = tpai_job(testhost, config, client_root, "--stats=json")
    assert r.returncode == 0, describe(r)
    assert b'"backend": "stage"' in r.stderr, describe(r)
    local = tmp_path / "local"
    shutil.copytree(samples_dir, local)
    assert_matches_local(client_root, local)
