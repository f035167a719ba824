"""Host profiles: what ``setup`` learnt about a host, so later commands need no flags.

``~/.config/topyaz-mount/config.toml`` (platformdirs) holds one table per host::

    [hosts."gpu-box"]
    remote_python = "/home/me/.local/share/topyaz-mount/venv-0.1.0/bin/python"
    backend = "auto"
    photo_cmd = "topyaz photo"
    ssh_options = ["IdentityFile=~/.ssh/gpu"]
    cache_cap = "20G"
    include = ["~/models/shared.cfg"]   # inputs the stage backend copies for every command
    grace = "15m"
    persist = "5m"

Precedence is one rule, in ``resolve``: a flag (or its environment variable) beats the
profile, the profile beats the built-in default. The file is the user's too: writing a
profile replaces only that host's table, byte for byte everything else stays, and the
new file is renamed into place so a crash never leaves half a config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .translate import DEFAULT_PRODUCTS
from .transport import Remote, SshSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_ENV = "TOPYAZ_MOUNT_CONFIG"
# How the agent shows the job the root (agent/backend.py): FUSE where a mount works.
BACKENDS = ("auto", "fuse", "stage")


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostOptions:
    """Everything a host can be told; ``None`` means "not said here"."""

    remote_python: str | None = None
    backend: str | None = None
    photo_cmd: str | None = None
    giga_cmd: str | None = None
    video_cmd: str | None = None
    ssh_options: tuple[str, ...] | None = None
    ssh_config: str | None = None
    cache_cap: str | None = None
    # Local paths every command reads that no argument names (``--include``).
    include: tuple[str, ...] | None = None
    # How long a session outlives a lost connection for the client to come back
    # (``90s``, ``15m``; ``0``: it ends with the connection). See reconnect.py.
    grace: str | None = None
    bwlimit: str | None = None  # "10M", "500k" or "UP:DOWN" (pacing.parse_bwlimit)
    # How long a one-shot exec's session stays up after its command for the next exec
    # to reuse (``5m``; ``0``: not at all). See persist.py.
    persist: str | None = None
    # The login shell of the host's ssh server: "sh" (POSIX), or "cmd" (Windows'
    # OpenSSH server), which gets the agent's command line built for it.
    shell: str | None = None


SHELLS = ("sh", "cmd")

DEFAULTS = HostOptions(
    remote_python="python3",
    backend="auto",
    photo_cmd=shlex.join(DEFAULT_PRODUCTS["photo"]),
    giga_cmd=shlex.join(DEFAULT_PRODUCTS["giga"]),
    video_cmd=shlex.join(DEFAULT_PRODUCTS["video"]),
    ssh_options=(),
    include=(),
    persist="5m",
    shell="sh",
)

_LIST_KEYS = {"ssh_options", "include"}
_STRING_KEYS = {f.name for f in fields(HostOptions)} - _LIST_KEYS


def config_path() -> Path:
    """``$TOPYAZ_MOUNT_CONFIG``, else the platform's user config dir."""
    given = os.environ.get(CONFIG_ENV)
    if given:
        return Path(given)
    import platformdirs

    return Path(platformdirs.user_config_dir("topyaz-mount")) / "config.toml"


def resolve(flags: HostOptions, profile: HostOptions | None) -> HostOptions:
    """Flags over the profile over the defaults, key by key.

    The lists add up: the flags' come first (ssh takes the first value it sees of an
    option, so a flag still wins over the profile's value of the same one), then the
    profile's.
    """
    merged: dict[str, Any] = {}
    for f in fields(HostOptions):
        name = f.name
        layers = [flags, profile or HostOptions(), DEFAULTS]
        if name in _LIST_KEYS:
            merged[name] = (
                *(getattr(flags, name) or ()),
                *((profile and getattr(profile, name)) or ()),
            )
            continue
        merged[name] = next(
            (getattr(x, name) for x in layers if getattr(x, name) is not None), None
        )
    return HostOptions(**merged)


def parse_size(text: str) -> int:
    """``500M``, ``20G``, ``1.5T`` or plain bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise UsageError(f"{text!r}: expected a size like 500M or 20G") from None
    if value < 0:
        raise UsageError(f"{text!r}: a size cannot be negative")
    return int(value * units[unit])


def human_size(n: float) -> str:
    """Bytes the way people read them, 1024-based (``parse_size``'s inverse, roughly)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# How long a remote session outlives a lost link by default (issue 14): a laptop that
# sleeps through a coffee break, or changes networks, finds its job still running.
DEFAULT_GRACE = 15 * 60.0


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m`` or ``1h``, in seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    unit = t[-1] if t and t[-1] in units else "s"
    try:
        value = float(t.removesuffix(unit))
    except ValueError:
        raise UsageError(f"{text!r}: expected a duration like 90s or 15m") from None
    if not 0 <= value < float("inf"):
        raise UsageError(f"{text!r}: a duration must be 0 or more")
    return value * units[unit]


def parse_bwlimit(text: str, given_as: str = "--bwlimit") -> tuple[int, int]:
    """``--bwlimit``: (bytes a second the client sends, bytes a second the agent sends),
    0 for no limit. ``10M`` (both ways), ``500k``, or ``UP:DOWN`` (``1M:10M``; ``0`` or
    nothing for no limit on that side). Suffixes count in 1024s, as sizes do.
    ``given_as``: where the value was written, for the error (the flag, or a profile's key)."""
    up, colon, down = text.partition(":")
    try:
        first = parse_size(up) if up.strip() else 0
        second = (parse_size(down) if down.strip() else 0) if colon else first
    except UsageError:
        raise UsageError(
            f"{given_as} {text!r}: expected a rate like 10M, 500k or UP:DOWN (1M:10M)"
        ) from None
    return first, second


def host_settings(
    remote: Remote, flags: HostOptions, agent_log_level: str = "WARNING"
) -> tuple[SshSettings, HostOptions]:
    """How to reach ``remote``: the one place flags meet the host's profile."""
    opts = resolve(flags, load_profile(str(remote)))
    if opts.backend not in BACKENDS:
        raise UsageError(
            f"backend {opts.backend!r} for {remote}: choose one of {', '.join(BACKENDS)}"
        )
    if opts.shell not in SHELLS:
        raise UsageError(
            f"{_given_as('shell', flags, remote)} {opts.shell!r}: choose one of "
            f"{', '.join(SHELLS)}"
        )
    grace = parse_duration(opts.grace) if opts.grace else DEFAULT_GRACE
    if opts.shell == "cmd" and grace > 0:
        # A detachable session's host listens on an AF_UNIX socket, which CPython on
        # Windows lacks: there the session ends with its connection.
        log.info("%s: a Windows host keeps no session past its connection (grace 0)", remote)
        grace = 0.0
    agent_args: tuple[str, ...] = ()
    if opts.backend != "auto":  # the agent's default
        agent_args = ("--backend", opts.backend)
    if opts.cache_cap is not None:
        agent_args += ("--cache-cap", str(parse_size(opts.cache_cap)))
    settings = SshSettings(
        remote,
        opts.ssh_options or (),
        opts.ssh_config,
        opts.remote_python or "python3",
        agent_args=agent_args,
        agent_log_level=agent_log_level,
        grace=grace,
        bwlimit=parse_bwlimit(opts.bwlimit, _given_as("bwlimit", flags, remote))
        if opts.bwlimit
        else (0, 0),
        remote_shell=opts.shell or "sh",
    )
    return settings, opts


def _given_as(key: str, flags: HostOptions, remote: Remote) -> str:
    """Where ``key``'s value came from: its flag, or the host's profile (file and key)."""
    if getattr(flags, key) is not None:
        return f"--{key.replace('_', '-')}"
    return f"{config_path()}: hosts.{remote}.{key} ="


def _parse_profile(name: str, table: Mapping[str, Any], path: Path) -> HostOptions:
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in _LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{path}: hosts.{name}.{key} must be a list of strings")
            values[key] = tuple(value)
        elif key in _STRING_KEYS:
            if isinstance(value, int) and key == "cache_cap":
                value = str(value)
            if not isinstance(value, str):
                raise UsageError(f"{path}: hosts.{name}.{key} must be a string")
            values[key] = value
        # Unknown keys are the user's business (or a newer version's): left alone.
    return HostOptions(**values)


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "", {}
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None


def load_profile(host: str, path: Path | None = None) -> HostOptions | None:
    """The profile of ``host`` (as typed after ``--remote``), or None."""
    path = path or config_path()
    _, data = _read(path)
    hosts = data.get("hosts", {})
    table = hosts.get(host) if isinstance(hosts, dict) else None
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError(f"{path}: hosts.{host} must be a table")
    return _parse_profile(host, table, path)


def _toml_string(text: str) -> str:
    # JSON's string escapes are TOML basic-string escapes (\uXXXX included).
    return json.dumps(text, ensure_ascii=False)


def _render(host: str, table: Mapping[str, Any]) -> str:
    lines = [f"[hosts.{_toml_string(host)}]"]
    for key, value in table.items():
        if isinstance(value, (list, tuple)):
            rendered = "[" + ", ".join(_toml_string(str(v)) for v in value) + "]"
        elif isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, (int, float)):
            rendered = repr(value)
        else:
            rendered = _toml_string(str(value))
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


_HEADER = re.compile(r"^\[")


def _names_table(line: str, host: str) -> bool:
    """Is this header line ``[hosts."HOST"]``, however the user quoted it?"""
    try:
        header = tomllib.loads("[_probe." + line.strip()[1:] + "\n")
    except tomllib.TOMLDecodeError:
        return False
    return header == {"_probe": {"hosts": {host: {}}}}


def _without_table(text: str, host: str) -> tuple[str, int]:
    """``text`` with the host's table cut out, and where it was (the end if absent)."""
    lines = text.splitlines(keepends=True)
    start = None
    for i, line in enumerate(lines):
        if not _HEADER.match(line):
            continue
        if start is not None:
            return "".join(lines[:start] + lines[i:]), len("".join(lines[:start]))
        if _names_table(line, host):
            start = i
    if start is not None:
        return "".join(lines[:start]), len("".join(lines[:start]))
    return text, len(text)


def save_profile(host: str, updates: HostOptions, path: Path | None = None) -> bool:
    """Write ``updates`` (its non-None keys) into the host's table, atomically; False
    if it said all that already (the file is then not touched).

    Keys the user set in that table and ``updates`` does not name stay as they were;
    other tables and comments stay byte for byte.
    """
    path = path or config_path()
    text, data = _read(path)
    hosts = data.get("hosts", {})
    old = hosts.get(host, {}) if isinstance(hosts, dict) else {}
    table: dict[str, Any] = dict(old) if isinstance(old, dict) else {}
    for f in fields(HostOptions):
        value = getattr(updates, f.name)
        if value is not None:
            table[f.name] = list(value) if isinstance(value, tuple) else value
    if table == old:
        return False
    rest, at = _without_table(text, host)
    before, after = rest[:at], rest[at:]
    if before and not before.endswith("\n"):
        before += "\n"
    if before.strip() and not before.endswith("\n\n"):
        before += "\n"
    new_text = before + _render(host, table) + ("\n" + after.lstrip("\n") if after else "")
    check = tomllib.loads(new_text)
    expected = dict(data)
    expected["hosts"] = {**(hosts if isinstance(hosts, dict) else {}), host: table}
    if check != expected:  # a layout this simple editor cannot follow: change nothing
        raise UsageError(
            f"{path}: cannot update hosts.{host} without touching other settings; "
            f"edit the file by hand"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(prefix=".config.toml.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(new_text)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True


def with_profile(flags: HostOptions, host: str) -> HostOptions:
    """The options for ``host``: ``flags`` resolved against its profile and the defaults."""
    return resolve(flags, load_profile(host))
