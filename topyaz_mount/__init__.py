"""topyaz-mount: run Topaz Labs jobs on a remote GPU host through a reverse FUSE mount."""

__version__ = "0.1.0"

from .api import AsyncRemote, CompletedRun, RemoteHost, RemoteMount, open_remote  # noqa: E402
from .errors import (  # noqa: E402
    AgentUnavailable,
    AuthenticationFailed,
    ConnectionFailed,
    JobTimeout,
    TopyazMountError,
)
from .executor import ExecutorContext, MountExecutor, RemoteOptions  # noqa: E402

__all__ = [
    "AgentUnavailable",
    "AsyncRemote",
    "AuthenticationFailed",
    "CompletedRun",
    "ConnectionFailed",
    "ExecutorContext",
    "JobTimeout",
    "MountExecutor",
    "RemoteHost",
    "RemoteMount",
    "RemoteOptions",
    "TopyazMountError",
    "__version__",
    "open_remote",
]
