"""Host profiles (config.toml): precedence, and writing that keeps what the user wrote."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from topyaz_mount.api import RemoteHost
from topyaz_mount.cli import _settings
from topyaz_mount.client.config import (
    DEFAULTS,
    HostOptions,
    load_profile,
    resolve,
    save_profile,
)
from topyaz_mount.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PROFILE = HostOptions(
    remote_python="/p/venv/bin/python",
    photo_cmd="tpai --cli",
    ssh_options=("IdentityFile=/k",),
    ssh_config="/p/ssh_config",
    cache_cap="20G",
)


def test_flags_over_profile_over_defaults():
    assert resolve(HostOptions(), None) == DEFAULTS
    got = resolve(HostOptions(), PROFILE)
    assert got.remote_python == "/p/venv/bin/python" and got.photo_cmd == "tpai --cli"
    assert got.giga_cmd == DEFAULTS.giga_cmd and got.backend == "auto"
    got = resolve(HostOptions(remote_python="/mine/python", cache_cap="1G"), PROFILE)
    assert got.remote_python == "/mine/python" and got.cache_cap == "1G"
    assert got.ssh_config == "/p/ssh_config"


def test_flag_ssh_options_come_first_so_ssh_takes_them():
    got = resolve(HostOptions(ssh_options=("IdentityFile=/flag",)), PROFILE)
    assert got.ssh_options == ("IdentityFile=/flag", "IdentityFile=/k")



def test_includes_add_up_and_a_backend_is_checked(config):
    config.parent.mkdir()
    config.write_text('[hosts.gpu]\ninclude = ["~/m.cfg"]\nbackend = "stage"\n')
    got = resolve(HostOptions(include=("/flag/x",)), load_profile("gpu"))
    assert got.include == ("/flag/x", "~/m.cfg") and got.backend == "stage"
    s = _settings("gpu", (), None, None, None, 0)
    assert s.agent_args == ("--backend", "stage")
    config.write_text('[hosts.gpu]\ninclude = "~/m.cfg"\n')
    with pytest.raises(UsageError, match="include must be a list of strings"):
        load_profile("gpu")
    config.write_text('[hosts.gpu]\nbackend = "nfs"\n')
    with pytest.raises(UsageError, match="choose one of auto, fuse, stage"):
        _settings("gpu", (), None, None, None, 0)

@pytest.fixture
def config(tmp_path, monkeypatch):
    path = tmp_path / "conf" / "config.toml"
    monkeypatch.setenv("TOPYAZ_MOUNT_CONFIG", str(path))
    return path


def test_cli_and_api_read_the_profile(config):
    save_profile("me@gpu:2222", PROFILE)
    s = _settings("me@gpu:2222", (), None, None, None, 0)
    assert s.remote_python == "/p/venv/bin/python" and s.config_file == "/p/ssh_config"
    assert s.options == ("IdentityFile=/k",)
    assert s.agent_args == ("--cache-cap", str(20 << 30))
    s = _settings("me@gpu:2222", ("Port=1",), "/f", "/flag/python", "2G", 0)
    assert s.remote_python == "/flag/python" and s.config_file == "/f"
    assert s.options == ("Port=1", "IdentityFile=/k")
    assert s.agent_args == ("--cache-cap", str(2 << 30))
    assert _settings("other", (), None, None, None, 0).remote_python == "python3"
    api = RemoteHost.parse("me@gpu:2222").settings()
    assert api.remote_python == "/p/venv/bin/python" and api.config_file == "/p/ssh_config"
    assert RemoteHost.parse("me@gpu:2222", remote_python="/x").settings().remote_python == "/x"


def test_writing_keeps_other_sections_comments_and_keys(config):
    config.parent.mkdir()
    original = (
        "# my settings\n[other]\nkeep = [1, 2]  # a comment\n\n"
        "[hosts.'gpu']\nphoto_cmd = 'mine'  # hand-written\nremote_python = \"old\"\n\n"
        "[hosts.\"b\"]\nbackend = \"fuse\"\n"
    )
    config.write_text(original)
    os.chmod(config, 0o640)
    assert save_profile("gpu", HostOptions(remote_python="/new/python", backend="fuse"))
    text = config.read_text()
    data = tomllib.loads(text)
    assert data["other"] == {"keep": [1, 2]}
    assert data["hosts"]["b"] == {"backend": "fuse"}
    assert data["hosts"]["gpu"] == {
        "photo_cmd": "mine", "remote_python": "/new/python", "backend": "fuse"
    }
    assert text.startswith("# my settings\n[other]\nkeep = [1, 2]  # a comment\n")
    assert '[hosts."b"]\nbackend = "fuse"\n' in text
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert [p.name for p in config.parent.iterdir()] == ["config.toml"]  # no temp left
    # Saying the same again does not touch the file.
    mtime = config.stat().st_mtime_ns
    assert not save_profile("gpu", HostOptions(remote_python="/new/python"))
    assert config.stat().st_mtime_ns == mtime


def test_a_new_file_is_private_and_names_survive_quoting(config):
    host = 'odd "name"\\x'
    save_profile(host, HostOptions(ssh_options=("A=b c",)))
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert load_profile(host) == HostOptions(ssh_options=("A=b c",))
    save_profile(host, HostOptions(remote_python="/p"))
    assert load_profile(host) == HostOptions(remote_python="/p", ssh_options=("A=b c",))


def test_bad_config_is_one_clear_error(config):
    config.parent.mkdir()
    config.write_text("[hosts.gpu\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_profile("gpu")
    config.write_text('[hosts.gpu]\nssh_options = "not a list"\n')
    with pytest.raises(UsageError, match="ssh_options must be a list of strings"):
        load_profile("gpu")
    with pytest.raises(UsageError, match="backend 'smb'"):
        config.write_text('[hosts.gpu]\nbackend = "smb"\n')
        _settings("gpu", (), None, None, None, 0)


def test_a_bad_bwlimit_in_a_profile_names_the_key_and_the_host(config):
    config.parent.mkdir()
    config.write_text('[hosts.gpu]\nbwlimit = "fast"\n')
    with pytest.raises(UsageError) as caught:
        _settings("gpu", (), None, None, None, 0)
    assert str(caught.value) == (
        f"{config}: hosts.gpu.bwlimit = 'fast': expected a rate like 10M, 500k or UP:DOWN "
        "(1M:10M)"
    )
    assert _settings("gpu", (), None, None, None, 0, bwlimit="1M").bwlimit == (1 << 20,) * 2
    with pytest.raises(UsageError, match="^--bwlimit 'slow'"):  # the flag's own value
        _settings("gpu", (), None, None, None, 0, bwlimit="slow")
    # From the command line: that one line, status 2, before any connection is tried.
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "topyaz_mount", "exec", "--remote", "gpu", "--", "true"],
        capture_output=True, text=True, timeout=60, cwd="/tmp",
        env={**os.environ, "TOPYAZ_MOUNT_CONFIG": str(config)},
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"topyaz-mount: {config}: hosts.gpu.bwlimit = 'fast': expected a rate like 10M, 500k "
        "or UP:DOWN (1M:10M)"
    ]
