"""Where this user's sessions live on this machine: the runtime dir, session names and
their control sockets.

The runtime dir is ``$TOPYAZ_MOUNT_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/topyaz-mount``,
else ``/tmp/topyaz-mount-<uid>``: 0700, and each socket 0600, both checked to be ours.
Apart from control.py (the messages) because a one-shot exec looks here for a session
to reuse before it starts ssh, and needs none of msgspec for that.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from ..errors import UsageError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ControlError(UsageError):
    """The control socket is missing, not ours, or spoke nonsense."""


def runtime_dir(create: bool = True) -> Path:
    """This user's directory for session sockets, private to the user."""
    explicit = os.environ.get("TOPYAZ_MOUNT_RUNTIME_DIR")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if explicit:
        path = Path(explicit)
    elif xdg and os.path.isdir(xdg):
        path = Path(xdg) / "topyaz-mount"
    else:
        path = Path(f"/tmp/topyaz-mount-{os.getuid()}")
    if create:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ControlError(f"cannot create {path}: {e.strerror}") from None
    try:
        st = path.lstat()
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ControlError(f"{path} is not a directory owned by you; refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UsageError(
            f"session name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)"
        )
    return name


def default_name(root: Path) -> str:
    """A session name from a root's: what `mount` names it unless told."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in root.name)
    cleaned = cleaned.lstrip("._-")[:64]
    return cleaned or "root"


def socket_path(name: str) -> Path:
    return runtime_dir() / f"{check_name(name)}.sock"


def session_names() -> list[str]:
    directory = runtime_dir(create=False)
    if not directory.is_dir():
        return []
    return sorted(p.name[: -len(".sock")] for p in directory.glob("*.sock"))


def checked_socket(name: str) -> Path:
    """The socket of session ``name``, checked to be a socket of ours."""
    path = socket_path(name)
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise ControlError(f"no session named {name} (see: topyaz-mount status)") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise ControlError(f"{path} is not a session socket of yours")
    return path


def unreachable(name: str, e: OSError) -> ControlError:
    if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
        return ControlError(f"session {name} is not running any more (its socket is stale)")
    return ControlError(f"cannot reach session {name}: {e.strerror}")
