"""The reuse rule of persisted sessions (persist.py), and where `persist` comes from."""

from __future__ import annotations

from dataclasses import replace

from topyaz_mount.client import persist
from topyaz_mount.client.config import DEFAULTS, HostOptions, resolve
from topyaz_mount.client.transport import Remote, SshSettings
from topyaz_mount.policy import PolicyOptions

BASE = SshSettings(Remote("gpu", "me", 2222), ("IdentityFile=/k",), "/cfg", "/venv/python")


def key(settings: SshSettings = BASE, root: str = "/work", **policy) -> str:
    return persist.reuse_key(settings, root, PolicyOptions(**policy))


def test_what_travels_per_command_or_only_logs_does_not_change_the_key():
    assert key() == key(replace(BASE, agent_log_level="INFO"))


def test_what_changes_the_job_gives_another_session():
    others = [
        key(root="/work/sub"),
        key(read_only=True),
        key(protect=(".env",)),
        key(hide=("*.raw",)),
        key(allow_write=(".envrc",)),
        key(replace(BASE, agent_args=("--backend", "stage"))),
        key(replace(BASE, agent_args=("--cache-cap", "1000"))),
        key(replace(BASE, bwlimit=(1 << 20, 0))),
        key(replace(BASE, grace=900.0)),
        key(replace(BASE, options=())),
        key(replace(BASE, config_file=None)),
        key(replace(BASE, remote_python="python3")),
        key(replace(BASE, remote=Remote("gpu", "me", 22))),
    ]
    assert len({key(), *others}) == len(others) + 1


def test_persist_is_five_minutes_unless_the_profile_or_a_flag_says():
    assert DEFAULTS.persist == "5m"
    profile = HostOptions(persist="0")
    assert resolve(HostOptions(), profile).persist == "0"
    assert resolve(HostOptions(persist="30s"), profile).persist == "30s"
