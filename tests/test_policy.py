"""The write policy: what a compromised remote may write and see under the root.

Unit tests of policy.py (no I/O), then the requests a compromised agent would send,
fed straight into ``FileServer.handle``: each is refused with the right errno, recorded
for the summary, and the file system is left exactly as it was.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import unicodedata
from pathlib import Path

import blake3
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from topyaz_mount.client.fileserver import FileServer
from topyaz_mount.client.jail import checked_root
from topyaz_mount.errors import UsageError
from topyaz_mount.policy import (
    DEFAULT_HIDE,
    DEFAULT_PROTECT,
    Policy,
    PolicyError,
    PolicyOptions,
    Refusal,
    RefusalLog,
    fold,
    link_target,
    root_refusal,
    safe_mode,
    summarize,
)
from topyaz_mount.wire import proto

pytestmark = pytest.mark.both_os_calls


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


DEFAULT = Policy.from_options(PolicyOptions())


def nfd(text: str) -> bytes:
    return unicodedata.normalize("NFD", text).encode()


# --- rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b".git",
        b".git/hooks/pre-commit",
        b".git/config",
        b".git/refs/heads/main",
        b"projects/app/.git/hooks/post-checkout",
        b".GIT/Hooks/pre-commit",  # macOS volumes are case-insensitive
        b".Git",
        ".g\u200cit/config".encode(),  # HFS+ ignores zero-width characters (CVE-2014-9390)
        ".git\ufeff/config".encode(),
        b".bashrc",
        b"deep/down/.BASHRC",
        b".zshrc",
        b".profile",
        b".bash_profile",
        b".zprofile",
        b".zshenv",
        b".zlogin",
        b".bash_login",
        b".bash_logout",
        b".inputrc",
        b".cshrc",
        b".tcshrc",
        b".config/fish/config.fish",
        b".config/fish/conf.d/x.fish",
        b".ssh/authorized_keys",
        b".gnupg/gpg.conf",
        b"Library/LaunchAgents/evil.plist",
        b"sub/library/launchagents/evil.plist",
        b"Library/LaunchDaemons/x.plist",
        b".config/autostart/x.desktop",
        b".config/systemd/user/x.service",
        b".envrc",
        b"project/.envrc",
        b".local/bin/ls",
        b".vscode/tasks.json",
        b".gitconfig",
    ],
)
def test_default_rules_refuse_writes_at_any_depth_and_case(path):
    assert DEFAULT.write_refusal(path) is not None


@pytest.mark.parametrize(
    "path",
    [
        b"",
        b"out/a.png",
        b"shots/a.jpg",
        b".out.png.tmp",
        b"git/hooks",
        b".github/workflows/ci.yml",
        b".gitignore",
        b"my.git",
        b".bashrc.bak",
        b"bashrc",
        b"Library/Preferences/x.plist",
        b"LaunchAgents/x",  # only under Library
        b".config/other/x",
        b".sshd",
        b"notes.key.txt",
    ],
)
def test_ordinary_outputs_are_writable(path):
    assert DEFAULT.write_refusal(path) is None
    assert not DEFAULT.hidden(path)


@pytest.mark.parametrize(
    "path",
    [
        b".ssh",
        b".ssh/id_ed25519",
        b"a/b/.SSH/id_rsa",
        b".gnupg/private-keys-v1.d/x.key",
        b".aws/credentials",
        b".netrc",
        b".docker/config.json",
        b".config/gcloud/credentials.db",
        b".kube/config",
        b"certs/server.pem",
        b"certs/SERVER.PEM",
        b"tls/client.key",
        b"Library/Keychains/login.keychain-db",
        nfd("café/.ssh/id_rsa"),
    ],
)
def test_secrets_are_hidden_and_not_writable(path):
    assert DEFAULT.hidden(path)
    assert DEFAULT.write_refusal(path) is not None


def test_every_default_rule_parses_and_protects_its_own_path():
    for pattern in DEFAULT_PROTECT:
        assert DEFAULT.write_refusal(pattern.encode()) is not None, pattern
    for pattern in DEFAULT_HIDE:
        example = pattern.replace("*", "x").encode()
        assert DEFAULT.hidden(example) and DEFAULT.write_refusal(example), pattern


def test_unicode_normalization_both_ways():
    composed = "Café/Résumé"
    policy = Policy.from_options(PolicyOptions(protect=(composed,)))
    assert policy.write_refusal(nfd(composed) + b"/x") is not None
    policy = Policy.from_options(PolicyOptions(protect=(unicodedata.normalize("NFD", composed),)))
    assert policy.write_refusal(composed.encode() + b"/x") is not None
    assert policy.write_refusal("CAFÉ/RÉSUMÉ".encode()) is not None
    assert fold(b"\xff\xfe") == fold(b"\xff\xfe")  # not UTF-8: compared as escapes


def test_user_rules_protect_hide_and_anchor():
    policy = Policy.from_options(
        PolicyOptions(protect=("Makefile", "/build/*.sh"), hide=("private", "*.secret"))
    )
    assert policy.write_refusal(b"sub/makefile") == "protected: Makefile"
    assert policy.write_refusal(b"build/run.sh") == "protected: /build/*.sh"
    assert policy.write_refusal(b"x/build/run.sh") is None  # anchored at the root
    assert policy.write_refusal(b"build/sub/run.sh") is None
    assert policy.hidden(b"a/Private/b") and policy.hidden(b"x.SECRET")
    assert policy.write_refusal(b"a/private") == "hidden: private"
    assert DEFAULT.write_refusal(b"sub/makefile") is None


def test_allow_write_lifts_exactly_one_rule():
    policy = Policy.from_options(PolicyOptions(allow_write=(".envrc",)))
    assert policy.write_refusal(b".envrc") is None
    assert policy.write_refusal(b".bashrc") is not None
    assert policy.write_refusal(b".git/config") is not None
    lifted = Policy.from_options(PolicyOptions(protect=("out/keep",), allow_write=("OUT/keep/",)))
    assert lifted.write_refusal(b"out/keep/x") is None
    # a hidden path stays hidden (and so unwritable) when its protection is lifted
    ssh = Policy.from_options(PolicyOptions(allow_write=(".ssh",)))
    assert ssh.write_refusal(b".ssh/authorized_keys") == "hidden: .ssh"


def test_allow_write_of_an_unknown_rule_is_a_usage_error():
    with pytest.raises(PolicyError, match="not a protection rule"):
        Policy.from_options(PolicyOptions(allow_write=("out",)))
    assert issubclass(PolicyError, UsageError)


@pytest.mark.parametrize("pattern", ["", "/", "a//b", "../x", "a/./b", "a\x00b"])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(PolicyError):
        Policy.from_options(PolicyOptions(protect=(pattern,)))


def test_read_only_refuses_every_write():
    policy = Policy.from_options(PolicyOptions(read_only=True))
    assert policy.write_refusal(b"out/a.png") == "read-only root"
    assert policy.write_refusal(b"") == "read-only root"
    assert not policy.hidden(b"out/a.png")


def test_the_agent_compiles_the_same_policy_from_its_rules():
    policy = Policy.from_options(PolicyOptions(protect=("x",), allow_write=(".envrc",)))
    again = Policy(*policy.rules())
    for path in (b"x/y", b".envrc", b".git/config", b"a.pem", b"out/a.png"):
        assert again.write_refusal(path) == policy.write_refusal(path)
        assert again.hidden(path) == policy.hidden(path)


def test_link_targets_resolve_by_name_and_never_out_of_the_root():
    assert link_target(b"out/g", b"../.git") == b".git"
    assert link_target(b"out/g", b"./x//y/../z") == b"out/x/z"
    assert link_target(b"a/b", b"..") == b""
    assert link_target(b"a/b", b"../..") is None
    assert link_target(b"g", b"/etc") is None


def test_safe_mode_drops_setuid_setgid_sticky():
    assert safe_mode(0o6777) == 0o777
    assert safe_mode(0o7755) == 0o755
    assert safe_mode(0o100644) == 0o644


# --- the summary -----------------------------------------------------------------------


def test_summary_is_one_escaped_line_per_path():
    refusals = [
        Refusal(b".bashrc", "write", "protected: .bashrc"),
        Refusal(b".bashrc", "chmod", "protected: .bashrc"),
        Refusal(b".bashrc", "write", "protected: .bashrc"),
        Refusal(b"evil\x1b]52;c;aGk=\x07\n.git/x", "mkdir", "protected: .git"),
    ]
    lines = summarize(refusals)
    assert lines[0] == "refused write, chmod of .bashrc (protected: .bashrc)"
    assert len(lines) == 2
    assert "\x1b" not in lines[1] and "\n" not in lines[1] and "\x07" not in lines[1]
    assert "\\x1b]52;c;aGk=\\x07\\x0a.git/x" in lines[1]


def test_refusal_log_is_bounded_and_marks_what_a_job_saw():
    log = RefusalLog()
    log.add(Refusal(b"a", "write", "x"))
    mark = log.count
    for i in range(5000):
        log.add(Refusal(b"p%d" % i, "write", "x"))
    since = log.since(mark)
    assert len(since) == 1000 and since[-1].path == b"p4999"
    assert len(summarize(since * 2)) == 1000


# --- the root --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "root",
    [
        "/",
        "/etc",
        "/etc/nginx",
        "/usr",
        "/usr/local/src",
        "/bin",
        "/var",
        "/var/lib/x",
        "/boot",
        "/dev",
        "/proc",
        "/sys",
        "/lib64",
        "/System",
        "/Library",
        "/Applications",
        "/private",  # contains /private/etc
        "/private/etc",
        "/private/var/db",
    ],
)
def test_system_roots_are_refused(root):
    assert root_refusal(root, "/home/me", allow_home=True) is not None


@pytest.mark.parametrize(
    "root", ["/home/me/photos", "/tmp/x", "/var/tmp/x", "/private/var/folders/ab/T/x", "/srv"]
)
def test_ordinary_roots_are_allowed(root):
    assert root_refusal(root, "/home/me", allow_home=False) is None


@pytest.mark.parametrize("root", ["/home/me", "/home", "/Users/me"])
def test_home_and_its_ancestors_need_allow_home(root):
    home = "/Users/me" if root.startswith("/Users") else "/home/me"
    assert "--allow-home" in (root_refusal(root, home, allow_home=False) or "")
    assert root_refusal(root, home, allow_home=True) is None


def test_checked_root_resolves_symlinks_first(tmp_path, monkeypatch):
    link = tmp_path / "to-etc"
    os.symlink("/etc", link)
    with pytest.raises(UsageError, match="system directory"):
        checked_root(link)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    os.symlink(home, tmp_path / "to-home")
    with pytest.raises(UsageError, match="--allow-home"):
        checked_root(tmp_path / "to-home")
    assert checked_root(tmp_path / "to-home", allow_home=True) == home
    with pytest.raises(UsageError, match="not a directory"):
        checked_root(tmp_path / "missing")


# --- what a compromised agent sends, served by the FileServer ---------------------------


def call(server: FileServer, req):
    return trio.run(server.handle, req)


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str | None, int]]:
    """Every path under the root: mode, content (or link target), mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                body: bytes | str | None = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                body = p.read_bytes()
            else:
                body = None
            found[str(p.relative_to(root))] = (st.st_mode, body, st.st_mtime_ns)
    return found


@pytest.fixture
def home(tmp_path):
    """A root that looks like a home directory with a git project in it."""
    root = tmp_path / "home"
    for d in ("proj/.git/hooks", "proj/.git/refs/heads", ".ssh", "out", "Library", "certs"):
        (root / d).mkdir(parents=True)
    files = {
        "proj/.git/config": b"[core]\n",
        "proj/.git/HEAD": b"ref: refs/heads/main\n",
        "proj/.git/refs/heads/main": b"0" * 40 + b"\n",
        "proj/a.jpg": b"input",
        ".bashrc": b"# mine\n",
        ".ssh/id_ed25519": b"PRIVATE KEY",
        ".ssh/authorized_keys": b"ssh-ed25519 AAAA me\n",
        "certs/server.pem": b"CERT",
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    os.chmod(root / ".bashrc", 0o644)
    server = FileServer(root)
    yield server, root
    server.close()


def refused(server, req, code=errno.EACCES):
    with pytest.raises(OSError) as info:
        call(server, req)
    assert info.value.errno == code, (req, info.value)


def commit(server, cid, path, data, mode=0o644):
    call(server, proto.CommitBegin(cid, path, mode))
    server.handle_chunk(proto.CommitChunk(cid, 0, data))
    return call(server, proto.CommitEnd(cid, len(data), blake3.blake3(data).digest()))


HOSTILE_WRITES = [
    proto.CommitBegin(1, b"proj/.git/hooks/pre-commit", 0o755),
    proto.CommitBegin(2, b"proj/.GIT/hooks/pre-commit", 0o755),
    proto.CommitBegin(3, b"proj/.git/config", 0o644),
    proto.CommitBegin(4, b".bashrc", 0o644),
    proto.CommitBegin(5, b".ssh/authorized_keys", 0o600),
    proto.CommitBegin(6, b"Library/LaunchAgents/evil.plist", 0o644),
    proto.CommitBegin(7, b".envrc", 0o644),
    proto.CommitBegin(8, b"certs/server.pem", 0o644),
    proto.Mkdir(b"Library/LaunchAgents", 0o755),
    proto.Mkdir(b"proj/.git/hooks/x", 0o755),
    proto.Mkdir(b".config", 0o755),  # allowed: only .config/autostart etc. are protected
    proto.Unlink(b"proj/.git/HEAD"),
    proto.Unlink(b".bashrc"),
    proto.Unlink(b".ssh/id_ed25519"),
    proto.Rmdir(b"proj/.git/hooks"),
    proto.SetAttr(b".bashrc", 0o777),
    proto.SetAttr(b"proj/.git/config", None, 0, 0),
    proto.Symlink(b"proj/.git/hooks/pre-commit", b"/tmp/evil"),
    proto.Symlink(b".profile", b"out/evil.sh"),
    proto.Rename(b"proj/a.jpg", b"proj/.git/hooks/pre-commit"),
    proto.Rename(b"proj/.git", b"proj/old-git"),  # moving .git away
    proto.Rename(b"proj/.git/hooks", b"out/hooks"),
    proto.Rename(b"proj", b"proj2"),  # a directory that contains .git
    proto.Rename(b"out", b".git"),  # a directory that would become .git
    proto.Rename(b".bashrc", b"out/bashrc"),
]


@pytest.mark.parametrize("req", HOSTILE_WRITES, ids=lambda r: type(r).__name__)
def test_hostile_write_is_refused_and_changes_nothing(home, req):
    server, root = home
    before = snapshot(root)
    if isinstance(req, proto.Mkdir) and req.path == b".config":
        call(server, req)  # the control: an ordinary directory is made
        assert (root / ".config").is_dir()
        return
    refused(server, req)
    assert snapshot(root) == before
    assert len(server.refusals.since(0)) == 1  # recorded once, for the summary


def test_a_directory_made_elsewhere_cannot_be_moved_into_a_protected_place(home):
    """mkdir t; t/LaunchAgents/evil.plist; mv t Library: neither t nor Library is
    protected, but Library/LaunchAgents/evil.plist would be."""
    server, root = home
    call(server, proto.Mkdir(b"t", 0o755))
    call(server, proto.Mkdir(b"t/LaunchAgents", 0o755))
    commit(server, 1, b"t/LaunchAgents/evil.plist", b"<plist/>")
    (root / "Library").rmdir()
    before = snapshot(root)
    refused(server, proto.Rename(b"t", b"Library"))
    assert snapshot(root) == before
    (refusal,) = server.refusals.since(0)
    assert refusal.path == b"t"
    assert refusal.why == "would make Library/LaunchAgents, protected: Library/LaunchAgents"


def test_a_symlink_made_by_the_job_does_not_carry_a_write_into_a_protected_place(home):
    """The jail never follows a symlink on the client: a link to .git is allowed (it
    is only text) but a write through it stops at the link."""
    server, root = home
    os.symlink("../proj/.git", root / "out/g")  # links the user made, or raced in
    os.symlink(root / "proj/.git/hooks", root / "out/h")
    before = snapshot(root)
    for path in (b"out/g/hooks/pre-commit", b"out/h/pre-commit", b"out/g/config"):
        with pytest.raises(OSError) as info:
            commit(server, 9, path, b"#!/bin/sh\nevil\n", mode=0o755)
        assert info.value.errno == errno.ENOTDIR
        with pytest.raises(OSError):
            call(server, proto.Mkdir(path, 0o755))
        with pytest.raises(OSError):
            call(server, proto.SetAttr(path, 0o777))
    assert snapshot(root) == before
    # and a commit over the link replaces the link, not its target
    commit(server, 10, b"out/g", b"plain")
    assert (root / "out/g").read_bytes() == b"plain" and not (root / "out/g").is_symlink()
    assert (root / "proj/.git/config").read_bytes() == b"[core]\n"


@pytest.mark.parametrize(
    ("link", "target", "why"),
    [
        (b"out/g", b"../proj/.git", "a link to proj/.git, protected: .git"),
        (b"out/h", b"../proj/.GIT/hooks/pre-commit", "protected: .git"),
        (b"out/k", b"../.ssh/id_ed25519", "hidden: .ssh"),
        (b"out/e", b"/etc/passwd", "a link out of the root"),
        (b"out/up", b"../../outside", "a link out of the root"),
        (b"proj/.git/hooks/pre-commit", b"../../a.jpg", "protected: .git"),
    ],
)
def test_the_job_cannot_make_a_link_a_local_program_would_follow_somewhere_bad(
    home, link, target, why
):
    server, root = home
    before = snapshot(root)
    refused(server, proto.Symlink(link, target))
    assert snapshot(root) == before
    (refusal,) = server.refusals.since(0)
    assert refusal.op == "symlink" and why in refusal.why


def test_links_within_the_root_are_made(home):
    server, root = home
    call(server, proto.Symlink(b"out/a", b"../proj/a.jpg"))
    call(server, proto.Symlink(b"out/b", b"./sub/../x.png"))
    assert os.readlink(root / "out/a") == "../proj/a.jpg"
    assert os.readlink(root / "out/b") == "./sub/../x.png"


def test_hidden_paths_do_not_exist_for_the_agent(home):
    server, root = home
    names = {e.name for e in call(server, proto.ListDir(b"")).entries}
    assert b".ssh" not in names and {b"proj", b".bashrc", b"out", b"certs"} <= names
    assert {e.name for e in call(server, proto.ListDir(b"certs")).entries} == set()
    for path in (b".ssh", b".ssh/id_ed25519", b".SSH/id_ed25519", b"certs/server.pem"):
        refused(server, proto.Stat(path), errno.ENOENT)
        refused(server, proto.OpenRead(path), errno.ENOENT)
        refused(server, proto.ListDir(path), errno.ENOENT)
        refused(server, proto.ReadLink(path), errno.ENOENT)
    entries = server.manifest([b".ssh/id_ed25519", b"certs/server.pem", b"proj/a.jpg"], 1 << 20)
    assert [e.path for e in entries] == [b"proj/a.jpg"]
    # protected but visible: the job may read its own project
    assert call(server, proto.Stat(b".bashrc")).attr.size == len(b"# mine\n")
    assert b"hooks" in {e.name for e in call(server, proto.ListDir(b"proj/.git")).entries}


def test_setuid_setgid_sticky_never_reach_the_client(home):
    server, root = home
    commit(server, 1, b"out/tool", b"#!/bin/sh\n", mode=0o6777)
    assert stat.S_IMODE(os.stat(root / "out/tool").st_mode) == 0o777
    call(server, proto.SetAttr(b"out/tool", 0o4755))
    assert stat.S_IMODE(os.stat(root / "out/tool").st_mode) == 0o755
    old = os.umask(0)
    try:
        call(server, proto.Mkdir(b"out/d", 0o7777))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(root / "out/d").st_mode) == 0o777
    call(server, proto.SetAttr(b"out/d", 0o3777))
    assert stat.S_IMODE(os.stat(root / "out/d").st_mode) == 0o777
    call(server, proto.Symlink(b"out/l", b"tool"))
    assert os.readlink(root / "out/l") == "tool"


def test_legit_outputs_still_work(home):
    server, root = home
    commit(server, 1, b"out/a.png", b"png")
    call(server, proto.Mkdir(b"out/tmp", 0o755))
    commit(server, 2, b"out/tmp/b.png", b"b")
    call(server, proto.Rename(b"out/tmp", b"out/final"))
    call(server, proto.SetAttr(b"out/a.png", 0o600, 1, 2))
    assert (root / "out/a.png").read_bytes() == b"png"
    assert (root / "out/final/b.png").read_bytes() == b"b"
    assert server.refusals.since(0) == []


def test_read_only_root_refuses_every_change_with_erofs(tmp_path):
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    (root / "in.jpg").write_bytes(b"input")
    server = FileServer(root, policy=Policy.from_options(PolicyOptions(read_only=True)))
    try:
        before = snapshot(root)
        for req in (
            proto.CommitBegin(1, b"out/a.png", 0o644),
            proto.Mkdir(b"out/d", 0o755),
            proto.Unlink(b"in.jpg"),
            proto.Rmdir(b"out"),
            proto.Rename(b"in.jpg", b"x.jpg"),
            proto.SetAttr(b"in.jpg", 0o600),
            proto.Symlink(b"l", b"in.jpg"),
        ):
            refused(server, req, errno.EROFS)
        assert snapshot(root) == before
        assert call(server, proto.Stat(b"in.jpg")).attr.size == 5
        first = summarize(server.refusals.since(0))[0]
        assert first == "refused write of out/a.png (read-only root)"
    finally:
        server.close()


@pytest.mark.parametrize("end_path", [b"proj/.git/hooks/pre-commit", b".bashrc", b".ssh/x"])
def test_a_commit_whose_end_names_a_protected_destination_is_refused(home, end_path):
    """A commit's end may name where it lands now (the job renamed it meanwhile): a
    hostile agent begins at an allowed path and ends at a protected one."""
    server, root = home
    before = snapshot(root)
    call(server, proto.CommitBegin(1, b"out/x", 0o755))
    server.handle_chunk(proto.CommitChunk(1, 0, b"evil"))
    with pytest.raises(OSError) as info:
        call(server, proto.CommitEnd(1, 4, blake3.blake3(b"evil").digest(), path=end_path))
    assert info.value.errno in (errno.EACCES, errno.ENOENT)
    after = snapshot(root)
    # the commit's temporary file came and went in out/ (a named one moves out/'s mtime)
    assert after.pop("out")[:2] == before.pop("out")[:2]
    assert after == before


# --- property: no sequence of requests changes a protected path or shows a hidden one ----

POLICY_PATHS = st.sampled_from(
    [
        b"out",
        b"out/a",
        b"out/.git",
        b"t",
        b"t/LaunchAgents",
        b"t/LaunchAgents/e.plist",
        b"Library",
        b"Library/LaunchAgents",
        b"proj",
        b"proj/.git",
        b"proj/.git/hooks",
        b"proj/.git/hooks/pre-commit",
        b"proj/.GIT/config",
        b"proj/a.jpg",
        b".bashrc",
        b".ssh",
        b".ssh/id_ed25519",
        b"certs",
        b"certs/server.pem",
        b"link",
        b"link/hooks/pre-commit",
    ]
)
POLICY_REQUESTS = st.one_of(
    st.builds(proto.Mkdir, POLICY_PATHS, st.sampled_from([0o755, 0o7777])),
    st.builds(proto.Rmdir, POLICY_PATHS),
    st.builds(proto.Unlink, POLICY_PATHS),
    st.builds(proto.Rename, POLICY_PATHS, POLICY_PATHS, st.booleans()),
    st.builds(
        proto.SetAttr, POLICY_PATHS, st.sampled_from([None, 0o6777]), st.just(None), st.just(0)
    ),
    st.builds(proto.Symlink, POLICY_PATHS, st.sampled_from([b"proj/.git", b"../.ssh", b"x"])),
    st.builds(proto.ListDir, POLICY_PATHS),
    st.builds(proto.Stat, POLICY_PATHS),
    st.builds(proto.OpenRead, POLICY_PATHS),
    st.tuples(st.just("commit"), POLICY_PATHS, st.sampled_from([0o644, 0o6755])),
)


def _guarded(root: Path) -> dict[str, tuple[int, bytes | str | None, int]]:
    """Everything under the root the default policy protects or hides."""
    return {rel: v for rel, v in snapshot(root).items() if DEFAULT.write_refusal(rel.encode())}


@settings(database=None, deadline=None, max_examples=80)
@given(st.lists(POLICY_REQUESTS, min_size=1, max_size=12))
def test_no_request_sequence_changes_a_protected_path_or_shows_a_hidden_one(reqs):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "home"
        for d in ("proj/.git/hooks", ".ssh", "out", "certs"):
            (root / d).mkdir(parents=True)
        (root / "proj/.git/config").write_bytes(b"[core]\n")
        (root / "proj/a.jpg").write_bytes(b"input")
        (root / ".bashrc").write_bytes(b"# mine\n")
        (root / ".ssh/id_ed25519").write_bytes(b"KEY")
        (root / "certs/server.pem").write_bytes(b"CERT")
        before = _guarded(root)
        server = FileServer(root)
        cid = 0
        try:
            for req in reqs:
                try:
                    if isinstance(req, tuple):
                        _, path, mode = req
                        cid += 1
                        commit(server, cid, path, b"#!/bin/sh\nevil\n", mode)
                    else:
                        res = call(server, req)
                        if isinstance(res, proto.Listing):
                            assert not any(
                                server.policy.hidden(req.path + b"/" + e.name) for e in res.entries
                            )
                        if isinstance(res, proto.Opened):
                            call(server, proto.CloseRead(res.handle))
                        if isinstance(req, proto.Stat | proto.OpenRead | proto.ListDir):
                            assert not DEFAULT.hidden(req.path), req
                except OSError:
                    pass
                assert _guarded(root) == before, req
                for rel, (mode, _, _) in snapshot(root).items():
                    assert not mode & 0o7000, (rel, oct(mode))
        finally:
            server.close()


def test_a_rename_names_what_it_would_move_and_a_huge_tree_is_refused(home, monkeypatch):
    server, root = home
    refused(server, proto.Rename(b"proj", b"elsewhere"))
    (refusal,) = server.refusals.since(0)
    assert (refusal.path, refusal.why) == (b"proj", "would move proj/.git, protected: .git")
    for i in range(5):
        (root / "out" / f"f{i}").write_bytes(b"x")
    monkeypatch.setattr("topyaz_mount.client.fileserver.MAX_RENAME_SCAN", 3)
    before = snapshot(root)
    refused(server, proto.Rename(b"out", b"out2"))
    assert snapshot(root) == before
    assert server.refusals.since(1)[0].why == "over 3 entries to check"
