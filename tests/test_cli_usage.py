"""A mistyped option of ours is a usage error, never a program run on the host."""

from __future__ import annotations

import os
import subprocess
import sys

CLI = [sys.executable, "-m", "topyaz_mount"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOPYAZ_MOUNT_PERSIST": "0"}  # one-shot: no session left (persist.py)
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, cwd="/tmp", env=env
    )


def test_a_mistyped_option_before_the_command_is_a_usage_error_with_a_suggestion():
    r = run("exec", "--remot", "127.0.0.1:1", "--", "ls")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "topyaz-mount: exec: no such option --remot (did you mean --remote?); "
        "a command that starts with a dash goes after --"
    ]


def test_an_unknown_option_with_nothing_close_is_named_too():
    r = run("exec", "--remote", "127.0.0.1:1", "--frobnicate", "x", "--", "ls")
    assert r.returncode == 2
    assert "no such option --frobnicate;" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_a_command_that_starts_with_a_dash_runs_after_the_double_dash():
    # It gets as far as connecting (and fails there: nothing listens on port 1).
    r = run("exec", "--remote", "127.0.0.1:1", "--", "--version")
    assert r.returncode == 255
    assert "no such option" not in r.stderr


def test_shell_takes_the_same_rule():
    r = run("shell", "--sesion", "x")
    assert r.returncode == 2
    assert "did you mean --session?" in r.stderr


def test_shell_without_a_command_is_no_usage_error():
    r = run("shell", "--session", "no-such-session")
    assert "Traceback" not in r.stderr
    assert "no such option" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_a_bwlimit_for_one_command_of_a_session_is_a_usage_error():
    """The session's link is paced as a whole (`mount --bwlimit`); a limit given to one
    of its commands would silently do nothing."""
    r = run("exec", "--session", "nosuch", "--bwlimit", "2M", "--", "true")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "topyaz-mount: --bwlimit belongs to `mount`: a session's commands share its link"
    ]
