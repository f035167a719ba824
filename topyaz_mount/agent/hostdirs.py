"""Where topyaz-mount keeps its files on a host, per OS: the one place that decides.

Standard library only, and self-contained: ``hostsetup``'s probe runs this module's
source on the host's bare Python (before any venv exists), so the probe and the agent
can never disagree on where the venv, the content store and the sessions live.

- Linux (and other Unixes): the XDG dirs (``~/.local/share``, ``~/.cache``), as
  platformdirs has them.
- macOS: ``~/Library/Application Support`` and ``~/Library/Caches``, as platformdirs
  has them. The caches dir holds the session trees of the stage backend: it is outside
  the privacy-protected folders (Desktop, Documents, Downloads), so a Topaz app run
  from ssh may read and write there without a consent prompt.
- Windows: ``%LOCALAPPDATA%\\topyaz-mount`` for both (not roamed), so a session tree is
  ``%LOCALAPPDATA%\\topyaz-mount\\sessions\\<id>\\root``.

Each function takes the platform, the environment and the home directory, so the
rules are tested for every OS on any OS.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import sys
from collections.abc import Mapping

APP = "topyaz-mount"


def _parts(
    system: str | None, environ: Mapping[str, str] | None, home: str | None
) -> tuple[str, Mapping[str, str], str]:
    system = system or sys.platform
    environ = os.environ if environ is None else environ
    if home is None:
        home = os.path.expanduser("~")
    return system, environ, home


def _windows_base(environ: Mapping[str, str], home: str) -> str:
    local = environ.get("LOCALAPPDATA") or ntpath.join(home, "AppData", "Local")
    return ntpath.join(local, APP)


# Each kind of dir: its folder under ~/Library (macOS), its XDG variable and default.
_KINDS = {
    "data": ("Application Support", "XDG_DATA_HOME", ".local/share"),
    "cache": ("Caches", "XDG_CACHE_HOME", ".cache"),
}


def _dir(
    kind: str, system: str | None, environ: Mapping[str, str] | None, home: str | None
) -> str:
    system, environ, home = _parts(system, environ, home)
    if system == "win32":
        return _windows_base(environ, home)
    library, variable, default = _KINDS[kind]
    if system == "darwin":
        return posixpath.join(home, "Library", library, APP)
    base = environ.get(variable, "").strip() or posixpath.join(home, default)
    return posixpath.join(base, APP)


def data_dir(
    system: str | None = None, environ: Mapping[str, str] | None = None, home: str | None = None
) -> str:
    """Where the venvs live (``setup``)."""
    return _dir("data", system, environ, home)


def cache_dir(
    system: str | None = None, environ: Mapping[str, str] | None = None, home: str | None = None
) -> str:
    """Where the agent keeps its content store, kept outputs and sessions."""
    return _dir("cache", system, environ, home)


def session_root(base: str, session_id: str, system: str | None = None) -> str:
    """The tree (or mountpoint) of one session, under ``cache_dir``."""
    join = ntpath.join if (system or sys.platform) == "win32" else posixpath.join
    return join(base, "sessions", session_id, "root")
