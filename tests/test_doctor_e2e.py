"""`topyaz-mount doctor`: says what the remote host has and what it lacks (real sshd)."""

from __future__ import annotations

import subprocess

from e2e_util import CLI, client_env, fuse_denied_to_remote_user


def doctor(testhost, *extra: str) -> subprocess.CompletedProcess:
    argv = [*CLI, "doctor", "--remote", testhost.remote, "-F", str(testhost.ssh_config), *extra]
    return subprocess.run(argv, env=client_env(), capture_output=True, text=True, timeout=60)


def test_doctor_on_a_good_host(testhost):
    r = doctor(testhost, "--remote-python", testhost.remote_python)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok   pyfuse3" in r.stdout and "ok   fuse: usable" in r.stdout
    assert "FAIL" not in r.stdout


def test_doctor_names_an_unusable_dev_fuse(testhost):
    with fuse_denied_to_remote_user():
        r = doctor(testhost, "--remote-python", testhost.remote_python, "--backend", "fuse")
    assert r.returncode == 255
    assert "FAIL fuse: /dev/fuse is not readable and writable" in r.stdout


def test_doctor_without_the_package(testhost):
    r = doctor(testhost, "--remote-python", "/usr/bin/python3")
    assert r.returncode == 255
    assert "Traceback" not in r.stderr and r.stderr == ""
    assert "--   setup: topyaz-mount" in r.stdout and "not set up" in r.stdout
    fail = [x for x in r.stdout.splitlines() if x.startswith("FAIL")]
    assert len(fail) == 1 and fail[0].startswith("FAIL agent (/usr/bin/python3): ")
    assert "not installed" in fail[0] and "topyaz-mount setup --remote" in fail[0]
