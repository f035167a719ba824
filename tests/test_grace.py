"""How long a detachable session outlives its connection (issue 14): the grace from a
flag, the host's profile or the API, and what the agent is told."""

from __future__ import annotations

import dataclasses

import pytest

from topyaz_mount.api import RemoteHost
from topyaz_mount.cli import _settings
from topyaz_mount.client.config import HostOptions, parse_duration, save_profile
from topyaz_mount.errors import UsageError


@pytest.fixture
def config(tmp_path, monkeypatch):
    path = tmp_path / "conf" / "config.toml"
    monkeypatch.setenv("TOPYAZ_MOUNT_CONFIG", str(path))
    return path


def test_durations():
    assert parse_duration("90") == 90 and parse_duration("90s") == 90
    assert parse_duration("15m") == 900 and parse_duration("1.5h") == 5400
    assert parse_duration("0") == 0
    for bad in ("soon", "-5m", "inf", "m"):
        with pytest.raises(UsageError):
            parse_duration(bad)


def test_flag_over_profile_over_default(config):
    assert _settings("gpu", (), None, None, None, 0).grace == 900  # 15 min by default
    assert RemoteHost.parse("gpu").settings().grace == 900
    save_profile("gpu", HostOptions(grace="0"))
    assert _settings("gpu", (), None, None, None, 0).grace == 0
    assert RemoteHost.parse("gpu").settings().grace == 0
    save_profile("gpu", HostOptions(grace="15m"))
    assert _settings("gpu", (), None, None, None, 0).grace == 900
    assert _settings("gpu", (), None, None, None, 0, grace="30s").grace == 30
    assert _settings("gpu", (), None, None, None, 0, grace="0").grace == 0
    assert RemoteHost.parse("gpu").settings().grace == 900
    assert RemoteHost.parse("gpu", grace="2m").settings().grace == 120


def test_the_agent_is_told_the_grace_but_not_on_attach(config):
    settings = _settings("gpu", (), None, None, None, 0, grace="15m")
    assert "--grace 900" in settings.remote_command()
    again = dataclasses.replace(settings, agent_args=("--attach", "abc"))
    assert "--grace" not in again.remote_command() and "--attach abc" in again.remote_command()
    assert "--grace" not in _settings("gpu", (), None, None, None, 0, grace="0").remote_command()


def test_grace_on_a_session_command_is_refused(tmp_path):
    from click.testing import CliRunner

    from topyaz_mount.cli import main

    r = CliRunner().invoke(main, ["exec", "--session", "x", "--grace", "5m", "--", "true"])
    assert r.exit_code == 2 and "--grace belongs to `mount`" in r.output
