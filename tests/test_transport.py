"""transport.py: parsing --remote, the ssh command line, and start-up failure messages."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topyaz_mount import __version__
from topyaz_mount.client.transport import Remote, SshSettings, explain_startup_failure
from topyaz_mount.errors import (
    AgentUnavailable,
    AuthenticationFailed,
    ConnectionFailed,
    UsageError,
)

# --- Remote.parse --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "user", "port"),
    [
        ("gpu-box", "gpu-box", None, None),
        ("alice@gpu-box", "gpu-box", "alice", None),
        ("alice@gpu-box:2222", "gpu-box", "alice", 2222),
        ("gpu-box:22", "gpu-box", None, 22),
        ("10.0.0.5:65535", "10.0.0.5", None, 65535),
        ("[::1]:2222", "::1", None, 2222),
        ("[::1]", "::1", None, None),
        ("bob@[fe80::1%eth0]:22", "fe80::1%eth0", "bob", 22),
        ("gpu.example.com", "gpu.example.com", None, None),
        ("user.name-1@h_1", "h_1", "user.name-1", None),
        ("  gpu-box  ", "gpu-box", None, None),
        ("gpu-box:0022", "gpu-box", None, 22),
    ],
)
def test_parse(text, host, user, port):
    r = Remote.parse(text)
    assert (r.host, r.user, r.port) == (host, user, port)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "@host",
        "user@",
        "host:",
        "host:abc",
        "host:0",
        "host:65536",
        "host:99999999999999999999",
        "a@b@c",
        "host name",
        "::1",
        "[::1",
        "-oProxyCommand=id",
        "-p2222",
        "host:22:33",
        "us er@host",
        "[]",
    ],
)
def test_parse_refuses(text):
    with pytest.raises(UsageError):
        Remote.parse(text)


@pytest.fixture(autouse=True)
def no_cipher_choice(monkeypatch):
    """The command lines here without the AES-GCM preference (tests/test_ciphers.py)."""
    from topyaz_mount.client import ciphers

    monkeypatch.setattr(ciphers.OS, "has_hardware_aes", lambda: False)


def test_parse_refuses_option_after_leading_space():
    with pytest.raises(UsageError):
        Remote.parse(" -oProxyCommand=id")


def test_option_like_host_cannot_become_an_ssh_option():
    """Whatever parse accepts, the destination comes after `--` on the ssh command line."""
    r = Remote("-oProxyCommand=id")
    argv = SshSettings(r).argv()
    assert argv.index("--") == argv.index("-oProxyCommand=id") - 1


def test_destination_and_str():
    assert Remote("h").destination == "h"
    assert Remote("h", "u").destination == "u@h"
    assert Remote("::1", "u", 22).destination == "u@::1"
    assert str(Remote("h")) == "h"
    assert str(Remote("h", "u", 2222)) == "u@h:2222"
    assert str(Remote("::1", None, 2222)) == "[::1]:2222"
    assert str(Remote("::1")) == "[::1]"


HOSTS = st.from_regex(r"[a-z0-9][a-z0-9.\-_]{0,20}", fullmatch=True) | st.from_regex(
    r"[0-9a-f]{1,4}(:[0-9a-f]{0,4}){2,7}", fullmatch=True
)
USERS = st.none() | st.from_regex(r"[a-z_][a-z0-9_.\-]{0,15}", fullmatch=True)
PORTS = st.none() | st.integers(1, 65535)


@settings(database=None, deadline=None, max_examples=120)
@given(HOSTS, USERS, PORTS)
def test_parse_str_round_trip(host, user, port):
    r = Remote(host, user, port)
    assert Remote.parse(str(r)) == r


# --- the ssh command line ------------------------------------------------------------


@pytest.fixture(autouse=True)
def _default_keepalive(monkeypatch):
    monkeypatch.delenv("TOPYAZ_MOUNT_KEEPALIVE", raising=False)


def test_argv_minimal():
    argv = SshSettings(Remote("gpu")).argv()
    assert argv == [
        "ssh",
        "-T",
        "-x",
        "-o",
        "ServerAliveInterval=10",
        "-o",
        "ServerAliveCountMax=6",
        "--",
        "gpu",
        f"exec python3 -m topyaz_mount.agent --client-version {__version__} --log-level WARNING",
    ]


def test_argv_full():
    s = SshSettings(
        Remote("gpu", "alice", 2222),
        options=("ServerAliveInterval=5", "StrictHostKeyChecking=no"),
        config_file="/tmp/my config",
        remote_python="/opt/py 3/bin/python3",
        agent_args=("--base-dir", "/scratch/it's here"),
        ssh_program="/usr/local/bin/ssh",
        agent_log_level="DEBUG",
    )
    argv = s.argv()
    assert argv[:3] == ["/usr/local/bin/ssh", "-T", "-x"]
    assert argv[argv.index("-F") + 1] == "/tmp/my config"
    assert argv[argv.index("-p") + 1] == "2222"
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    # the user's options come first, so ssh takes their values over our defaults
    assert opts == [
        "ServerAliveInterval=5",
        "StrictHostKeyChecking=no",
        "ServerAliveInterval=10",
        "ServerAliveCountMax=6",
    ]
    assert argv[-3:-1] == ["--", "alice@gpu"]
    assert argv[-1] == s.remote_command()
    # every option precedes the destination
    assert max(i for i, a in enumerate(argv) if a.startswith("-") and a != "--") < argv.index("--")


def test_keepalive_timing_reaches_ssh_and_the_agent(monkeypatch):
    monkeypatch.setenv("TOPYAZ_MOUNT_KEEPALIVE", "1,5")
    s = SshSettings(Remote("gpu"))
    argv = s.argv()
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert opts == ["ServerAliveInterval=1", "ServerAliveCountMax=6"]
    assert argv[-1].endswith("--keepalive 1,5")
    monkeypatch.setenv("TOPYAZ_MOUNT_KEEPALIVE", "5,1")
    with pytest.raises(UsageError, match="TOPYAZ_MOUNT_KEEPALIVE"):
        SshSettings(Remote("gpu"))


def test_remote_command_quotes_every_word():
    s = SshSettings(
        Remote("gpu"),
        remote_python="python3; rm -rf ~",
        agent_args=("--base-dir", "$(touch /tmp/pwned)", "a b"),
        agent_log_level="INFO",
    )
    cmd = s.remote_command()
    assert cmd.startswith("exec ")
    assert shlex.split(cmd) == [
        "exec",
        "python3; rm -rf ~",
        "-m",
        "topyaz_mount.agent",
        "--client-version",
        __version__,
        "--log-level",
        "INFO",
        "--base-dir",
        "$(touch /tmp/pwned)",
        "a b",
    ]


@settings(database=None, deadline=None, max_examples=200)
@given(
    st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s),
    st.lists(st.text(max_size=10).filter(lambda s: "\x00" not in s), max_size=4),
)
def test_remote_command_round_trips_through_a_shell_split(py, args):
    s = SshSettings(Remote("gpu"), remote_python=py, agent_args=tuple(args))
    words = shlex.split(s.remote_command())
    assert words == [
        "exec", py, "-m", "topyaz_mount.agent", "--client-version", __version__,
        "--log-level", "WARNING", *args,
    ]


def test_no_port_flag_without_port_and_no_config_flag_without_file():
    argv = SshSettings(Remote("gpu", "u")).argv()
    assert "-p" not in argv and "-F" not in argv


# --- start-up failures ---------------------------------------------------------------

S = SshSettings(Remote("gpu", "alice", 2222))


def explain(*lines, settings=S):
    return explain_startup_failure(settings, list(lines))


def test_auth_failure():
    e = explain("alice@gpu: Permission denied (publickey,password).")
    assert type(e) is AuthenticationFailed
    assert isinstance(e, ConnectionFailed)
    assert "alice@gpu:2222" in str(e)
    assert "Permission denied" in str(e)
    assert type(explain("Received disconnect: Too many authentication failures")) is (
        AuthenticationFailed
    )


def test_package_missing_on_remote():
    e = explain(
        "/usr/bin/python3: Error while finding module specification for "
        "'topyaz_mount.agent' (ModuleNotFoundError: No module named 'topyaz_mount')"
    )
    assert type(e) is AgentUnavailable
    assert "topyaz-mount is not installed" in str(e)
    assert "run `topyaz-mount setup --remote alice@gpu:2222`" in str(e)


def test_dependency_missing_on_remote():
    e = explain(
        "Traceback (most recent call last):",
        '  File "/usr/lib/python3.11/runpy.py", line 198, in _run_module_as_main',
        "ModuleNotFoundError: No module named 'pyfuse3'",
    )
    assert type(e) is AgentUnavailable
    assert "'pyfuse3'" in str(e)
    e = explain("ModuleNotFoundError: No module named 'trio._core'")
    assert "'trio'" in str(e)


@pytest.mark.parametrize(
    "line",
    [
        "bash: python3: command not found",
        "bash: line 1: exec: python3: not found",
        "zsh:1: command not found: python3",
        "sh: 1: exec: python3: not found",
    ],
)
def test_no_interpreter(line):
    e = explain(line)
    assert type(e) is AgentUnavailable
    assert "no Python interpreter 'python3'" in str(e)
    assert "--remote-python" in str(e)


def test_no_interpreter_custom_python():
    s = SshSettings(Remote("gpu"), remote_python="/opt/venv/bin/python")
    e = explain("bash: line 1: /opt/venv/bin/python: No such file or directory", settings=s)
    assert "no Python interpreter '/opt/venv/bin/python'" in str(e)


@pytest.mark.parametrize(
    "line",
    [
        "ssh: Could not resolve hostname gpu: Name or service not known",
        "ssh: connect to host gpu port 2222: Connection refused",
        "ssh: connect to host gpu port 2222: Connection timed out",
        "ssh: connect to host gpu port 2222: No route to host",
        "ssh: connect to host gpu port 2222: Network is unreachable",
        "Connection closed by 10.0.0.5 port 2222",
        "kex_exchange_identification: read: Connection reset by peer",
        "Host key verification failed.",
    ],
)
def test_connection_failures(line):
    e = explain("some earlier noise", line)
    assert type(e) is ConnectionFailed
    assert line in str(e)
    assert "alice@gpu:2222" in str(e)


def test_unknown_failure_reports_the_last_nonblank_line():
    e = explain("agent[12] ERROR something odd", "", "   ")
    assert type(e) is AgentUnavailable
    assert "agent[12] ERROR something odd" in str(e)
    e = explain()
    assert type(e) is AgentUnavailable
    assert "no message" in str(e)


def test_auth_wins_over_other_patterns():
    e = explain("ssh: connect to host gpu port 22: Connection refused", "Permission denied")
    assert type(e) is AuthenticationFailed


def test_agent_crash_is_not_mistaken_for_a_missing_interpreter():
    e = explain(
        "Traceback (most recent call last):",
        '  File "/usr/lib/python3.11/runpy.py", line 198, in _run_module_as_main',
        '  File "/home/alice/.local/lib/python3.11/site-packages/topyaz_mount/agent/session.py"'
        ", line 80, in serve",
        "FileNotFoundError: [Errno 2] No such file or directory: '/run/user/1000/x'",
    )
    assert type(e) is AgentUnavailable
    assert "no Python interpreter" not in str(e)
    assert "FileNotFoundError" in str(e)
