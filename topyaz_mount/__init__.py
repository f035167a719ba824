"""topyaz-mount: run Topaz Labs jobs on a remote GPU host through a reverse FUSE mount.

The public names are imported on first use (PEP 562), so the remote agent and the
command line do not pay for the library API's imports at every start.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncRemote": "api",
    "CompletedRun": "api",
    "RemoteHost": "api",
    "RemoteMount": "api",
    "open_remote": "api",
    "PolicyOptions": "policy",
    "AgentUnavailable": "errors",
    "AuthenticationFailed": "errors",
    "ConnectionFailed": "errors",
    "JobTimeout": "errors",
    "TopyazMountError": "errors",
    "TranslationError": "client.translate",
    "Progress": "client.progress",
    "ExecutorContext": "executor",
    "MountExecutor": "executor",
    "RemoteOptions": "executor",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'topyaz_mount' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
