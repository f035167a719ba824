"""The host-OS pieces of the stage path, for every OS on this one: where the files go
(hostdirs), and the Windows parts (winhost) with Windows paths. No Windows or macOS
host runs here; these pin the rules."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
from types import SimpleNamespace

import platformdirs.macos
import platformdirs.unix
import pytest
import trio

from topyaz_mount.agent import hostdirs, winhost
from topyaz_mount.agent.stage_backend import StageBackend
from topyaz_mount.wire import proto

# --------------------------------------------------------------------------- hostdirs


@pytest.mark.parametrize("system", ["linux", "darwin"])
def test_linux_and_macos_dirs_are_platformdirs(system, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    dirs = (platformdirs.macos.MacOS if system == "darwin" else platformdirs.unix.Unix)(
        "topyaz-mount"
    )
    assert hostdirs.cache_dir(system) == dirs.user_cache_dir
    assert hostdirs.data_dir(system) == dirs.user_data_dir


def test_the_macos_tree_is_under_library_caches():
    assert hostdirs.cache_dir("darwin", {}, "/Users/me") == "/Users/me/Library/Caches/topyaz-mount"
    assert hostdirs.session_root("/Users/me/Library/Caches/topyaz-mount", "s1", "darwin") == (
        "/Users/me/Library/Caches/topyaz-mount/sessions/s1/root"
    )
    assert hostdirs.data_dir("darwin", {}, "/Users/me") == (
        "/Users/me/Library/Application Support/topyaz-mount"
    )


def test_linux_follows_xdg():
    env = {"XDG_CACHE_HOME": "/x/cache", "XDG_DATA_HOME": "/x/data"}
    assert hostdirs.cache_dir("linux", env, "/home/u") == "/x/cache/topyaz-mount"
    assert hostdirs.data_dir("linux", env, "/home/u") == "/x/data/topyaz-mount"
    assert hostdirs.cache_dir("linux", {}, "/home/u") == "/home/u/.cache/topyaz-mount"
    assert hostdirs.data_dir("linux", {}, "/home/u") == "/home/u/.local/share/topyaz-mount"


def test_windows_sessions_are_under_localappdata():
    local = "C:\\Users\\me\\AppData\\Local"
    assert winhost.session_tree(local, "ab12") == (
        "C:\\Users\\me\\AppData\\Local\\topyaz-mount\\sessions\\ab12\\root"
    )
    # Without LOCALAPPDATA, the profile's default place.
    assert hostdirs.cache_dir("win32", {}, "C:\\Users\\me") == (
        "C:\\Users\\me\\AppData\\Local\\topyaz-mount"
    )


def test_the_agent_default_base_dir_is_the_cache_dir():
    from topyaz_mount.agent.__main__ import default_base_dir

    assert str(default_base_dir()) == hostdirs.cache_dir()


# --------------------------------------------------------------------------- winhost


@pytest.mark.parametrize(
    "argv",
    [
        ["tpai", "--cli", "a b.png", "-o", "out"],
        ["gigapixel", "-i", 'say "hi".jpg', "--scale", "2"],
        ["tool", "trailing\\", "C:\\dir with space\\", "", "a&b|c>d"],
    ],
)
def test_the_command_line_is_list2cmdline_and_parses_back(argv):
    line = winhost.command_line(argv)
    assert line == subprocess.list2cmdline(argv)
    assert _parse_windows_args(line) == argv


def _parse_windows_args(line: str) -> list[str]:
    """How the Microsoft C runtime splits a command line (the rules list2cmdline targets)."""
    args: list[str] = []
    cur: list[str] = []
    i, quoted, started = 0, False, False
    while i < len(line):
        c = line[i]
        if c == "\\":
            n = 0
            while i < len(line) and line[i] == "\\":
                n += 1
                i += 1
            if i < len(line) and line[i] == '"':
                cur.append("\\" * (n // 2))
                if n % 2:
                    cur.append('"')
                    i += 1
            else:
                cur.append("\\" * n)
            started = True
            continue
        if c == '"':
            quoted = not quoted
            started = True
        elif c in " \t" and not quoted:
            if started:
                args.append("".join(cur))
                cur, started = [], False
        else:
            cur.append(c)
            started = True
        i += 1
    if started:
        args.append("".join(cur))
    return args


def test_the_command_line_of_nothing_is_refused():
    with pytest.raises(ValueError):
        winhost.command_line([])


@pytest.mark.parametrize(
    "name",
    ["CON", "con.txt", "Nul.tar.gz", "COM1", "lpt9.png", "AUX .txt", "a:b", "q?", 'x"y', "p|q",
     "a*b", "<in>", "tab\there", "dot.", "space ", ".", ""],
)
def test_names_windows_cannot_hold(name):
    assert winhost.name_problem(name) is not None


@pytest.mark.parametrize(
    "name",
    ["CONSOLE.txt", "COM10", "LPT0", "com", "nul_", "photo.png", "ünïcode 名.jpg", ".hidden"],
)
def test_names_windows_can_hold(name):
    assert winhost.name_problem(name) is None


TREE = "C:\\Users\\me\\AppData\\Local\\topyaz-mount\\sessions\\ab12\\root"


def test_a_path_problem_names_the_offender_in_one_line():
    assert winhost.path_problem(["in/a.png", "in/b.png", "out"], TREE) is None
    why = winhost.path_problem(["in/a.png", "in/aux.png"], TREE)
    assert why is not None and why.startswith("in/aux.png: ") and "\n" not in why
    assert "AUX" in why


def test_case_only_clashes_in_one_directory_are_refused():
    why = winhost.path_problem(["shots/Photo.png", "shots/photo.PNG"], TREE)
    assert why == "shots/photo.PNG: differs from shots/Photo.png only in case (one to Windows)"
    why = winhost.path_problem(["A/x.png", "a/y.png"], TREE)
    assert why is not None and "differs from A only in case" in why
    # The same name in two directories is fine.
    assert winhost.path_problem(["a/x.png", "b/X.png"], TREE) is None


def test_paths_over_max_path_are_refused_unless_long_paths_are_on():
    room = winhost.MAX_PATH - 1 - len(TREE) - 1  # the longest relative path that fits
    fits = "d/" + "x" * (room - 2)
    assert winhost.path_problem([fits], TREE) is None
    why = winhost.path_problem([fits + "y"], TREE)
    assert why is not None and why.endswith(": 260 characters on the host, over Windows' 259")
    assert winhost.path_problem([fits + "y"], "\\\\?\\" + TREE) is None


def test_signals_map_to_break_or_terminate():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        assert winhost.action_for(sig) == winhost.BREAK
    assert winhost.action_for(signal.SIGKILL) == winhost.TERMINATE
    if sys.platform != "win32":
        assert winhost.creation_flags() == 0
        job = winhost.JobObject(12345)
        assert job.handle is None
        with pytest.raises(OSError):
            job.signal(signal.SIGINT)


def test_the_stage_backend_refuses_windows_names_before_staging(tmp_path):
    tree = tmp_path / "root"
    ctx = SimpleNamespace(mountpoint=tree, session_dir=tmp_path)
    backend = StageBackend(ctx)  # type: ignore[arg-type]
    backend.windows = True
    entry = proto.ManifestEntry(b"in/Photo.png", 3, 0)
    other = proto.ManifestEntry(b"in/photo.png", 3, 0)
    backend.inputs(1, [entry, other])
    run = proto.Run(1, ["tpai", "in"], str(tree), {}, False, None)
    with pytest.raises(OSError) as e:
        trio.run(backend.prepare, 1, run)
    assert e.value.errno == errno.EINVAL
    assert "in/photo.png: differs from in/Photo.png only in case" in str(e.value)
    assert not tree.exists()  # nothing was staged


# --- the client's side: the agent's command line for cmd.exe (Windows' OpenSSH server)


def test_a_cmd_host_gets_the_agent_command_line_cmd_parses_back(tmp_path, monkeypatch):
    from topyaz_mount.client.config import HostOptions, host_settings, save_profile
    from topyaz_mount.client.transport import Remote

    monkeypatch.setenv("TOPYAZ_MOUNT_CONFIG", str(tmp_path / "config.toml"))
    python = r"C:\Program Files\Python312\python.exe"
    save_profile("win", HostOptions(remote_python=python, shell="cmd", backend="stage"))
    settings, _ = host_settings(Remote.parse("win"), HostOptions())
    assert settings.remote_shell == "cmd"
    assert settings.grace == 0  # no AF_UNIX on Windows: no detachable session there
    line = settings.remote_command()
    assert not line.startswith("exec ")
    words = _parse_windows_args(line)
    assert words[:3] == [python, "-m", "topyaz_mount.agent"]
    assert words[words.index("--backend") + 1] == "stage"


def test_cmd_metacharacters_where_cmd_acts_on_them_are_refused():
    from topyaz_mount.client.transport import shell_line
    from topyaz_mount.errors import UsageError

    # Inside quotes cmd takes & | < > ^ as they are; the C runtime gives the argv back.
    words = ["py", "a&b c", "d|e f"]
    assert _parse_windows_args(shell_line(words, "cmd")) == words
    for bad in (["py", "a&b"], ["py", "x^y"], ["py", "%TEMP%"], ["py", "50 %"]):
        with pytest.raises(UsageError, match="cmd.exe"):
            shell_line(bad, "cmd")
    assert shell_line(["py", "a b"], "sh") == "exec py 'a b'"


def test_a_shell_the_profile_cannot_name_is_one_line(tmp_path, monkeypatch):
    from topyaz_mount.client.config import HostOptions, host_settings, save_profile
    from topyaz_mount.client.transport import Remote
    from topyaz_mount.errors import UsageError

    monkeypatch.setenv("TOPYAZ_MOUNT_CONFIG", str(tmp_path / "config.toml"))
    save_profile("win", HostOptions(shell="powershell"))
    with pytest.raises(UsageError, match="shell = 'powershell'.*choose one of sh, cmd"):
        host_settings(Remote.parse("win"), HostOptions())
