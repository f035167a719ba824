"""Whether this host can mount a FUSE file system as this user, and if not why.

Standard library only, and self-contained: ``hostsetup``'s probe runs this module's
source on the host's bare Python, so ``setup`` decides whether to install pyfuse3
by the same rule the agent's ``auto`` backend uses before it tries a mount.
"""

from __future__ import annotations

import os
import shutil
import sys


def fuse_problem() -> str | None:
    """Why a FUSE mount cannot work here (checked before trying one), or None."""
    if not sys.platform.startswith("linux"):
        return f"FUSE mounts are supported on Linux only (this host is {sys.platform})"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (load the fuse module or allow the device)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        import pwd

        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = str(os.getuid())
        return (
            f"/dev/fuse is not readable and writable by user {user} "
            f"(fix with: chmod 0666 /dev/fuse)"
        )
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (install the fuse3 package)"
    return None
