"""The cipher choice (client/ciphers.py): AES-GCM first, unless the user chose."""

from __future__ import annotations

from pathlib import Path

import pytest

from topyaz_mount.client import ciphers
from topyaz_mount.client.transport import Remote, SshSettings


@pytest.fixture
def aes(monkeypatch):
    monkeypatch.setattr(ciphers.OS, "has_hardware_aes", lambda: True)


def test_aes_gcm_goes_first_where_nothing_chose(tmp_path: Path, aes):
    config = tmp_path / "config"
    config.write_text("Host gpu\n  # Ciphers chacha20-poly1305@openssh.com\n  Port 22\n")
    argv = SshSettings(Remote("gpu"), config_file=str(config)).argv()
    i = argv.index(f"Ciphers={ciphers.AES_GCM_FIRST}")
    assert argv[i - 1] == "-o" and i < argv.index("--")


def test_a_users_ciphers_option_stands(tmp_path: Path, aes):
    config = tmp_path / "config"
    config.write_text("")
    argv = SshSettings(Remote("gpu"), options=("ciphers=aes128-ctr",),
                       config_file=str(config)).argv()
    assert not any(a.startswith("Ciphers=") for a in argv)


@pytest.mark.parametrize("line", ["Ciphers aes256-ctr", "  ciphers=aes256-ctr",
                                  "Match host x\n\tCiphers +aes128-cbc"])
def test_a_ciphers_line_in_the_config_stands(tmp_path: Path, aes, line):
    config = tmp_path / "config"
    config.write_text(f"Host *\n  ServerAliveInterval 5\n{line}\n")
    assert ciphers.cipher_options(str(config), ()) == []


def test_a_ciphers_line_in_an_included_file_stands(tmp_path: Path, aes):
    home = tmp_path / "home"
    (home / ".ssh" / "conf.d").mkdir(parents=True)
    (home / ".ssh" / "config").write_text('Include "conf.d/*.conf"\n')
    (home / ".ssh" / "conf.d" / "a.conf").write_text("Host a\n  User me\n")
    assert not ciphers.user_sets_ciphers(str(home / ".ssh" / "config"), home=home)
    (home / ".ssh" / "conf.d" / "b.conf").write_text("Host b\n  Ciphers aes256-ctr\n")
    assert ciphers.user_sets_ciphers(None, home=home)
    # -F replaces the user's file: a relative Include is still read from ~/.ssh
    other = tmp_path / "other"
    other.write_text("Include conf.d/b.conf\n")
    assert ciphers.user_sets_ciphers(str(other), home=home)


def test_an_include_loop_is_taken_as_a_choice(tmp_path: Path, aes):
    loop = tmp_path / "loop"
    loop.write_text(f"Include {loop}\n")
    assert ciphers.user_sets_ciphers(str(loop), home=tmp_path)


def test_no_aes_instructions_no_change(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(ciphers.OS, "has_hardware_aes", lambda: False)
    config = tmp_path / "config"
    config.write_text("")
    assert ciphers.cipher_options(str(config), ()) == []
