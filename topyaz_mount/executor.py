"""An executor with topyaz's shape, running commands through the mount.

``MountExecutor(RemoteOptions(host=...), ExecutorContext(...)).execute(argv)`` returns
``(returncode, stdout, stderr)`` like topyaz's own executors; no import of topyaz is
needed. The first call connects; later calls reuse the session (one ssh connection, one
mount) until ``close()``. Only the context's environment variables are forwarded, with
values that are paths under the root translated (e.g. TVAI_MODEL_DIR).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .api import RemoteHost, RemoteMount
from .errors import (
    EXIT_FAILURE,
    AuthenticationFailed,
    ConnectionFailed,
    JobTimeout,
    TopyazMountError,
)
from .policy import PolicyOptions

__all__ = [
    "AuthenticationFailed",
    "ConnectionFailed",
    "ExecutorContext",
    "JobTimeout",
    "MountExecutor",
    "RemoteOptions",
]


@dataclass
class RemoteOptions:
    """Mirrors topyaz's RemoteOptions."""

    host: str
    user: str | None = None
    ssh_key: str | None = None
    ssh_port: int = 22
    connection_timeout: int = 30
    remote_folder: str | None = None  # topyaz staged files here; the mount needs no folder
    ssh_options: tuple[str, ...] = ()
    ssh_config: str | None = None
    remote_python: str | None = None  # None: the host's profile (from `setup`), else python3


@dataclass
class ExecutorContext:
    """Mirrors topyaz's ExecutorContext."""

    working_dir: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    timeout: int | None = None
    dry_run: bool = False


class MountExecutor:
    def __init__(
        self,
        options: RemoteOptions,
        context: ExecutorContext | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        policy: PolicyOptions | None = None,
    ) -> None:
        self.options = options
        self.policy = policy  # what the remote may write and see (default rules if None)
        self.context = context or ExecutorContext()
        self.root = os.path.realpath(root or self.context.working_dir or os.getcwd())
        self._mount: RemoteMount | None = None

    def _host(self) -> RemoteHost:
        # topyaz's own RemoteOptions has no ssh_options, ssh_config or remote_python.
        o = self.options
        ssh_key = o.ssh_key
        return RemoteHost(
            o.host,
            o.user,
            o.ssh_port if o.ssh_port and o.ssh_port != 22 else None,
            os.fspath(ssh_key) if ssh_key else None,
            tuple(getattr(o, "ssh_options", ())),
            getattr(o, "ssh_config", None),
            getattr(o, "remote_python", None),
            float(o.connection_timeout),
        )

    def _session(self) -> RemoteMount:
        if self._mount is None or not self._mount.is_open:
            mount = RemoteMount(self._host(), self.root, self.policy)
            mount.open()
            self._mount = mount
        return self._mount

    def execute(
        self, command: list[str], input_data: str | None = None, timeout: int | None = None
    ) -> tuple[int, str, str]:
        """Run ``command`` remotely; raises JobTimeout, AuthenticationFailed or
        ConnectionFailed, and TopyazMountError for anything else of ours."""
        if self.context.dry_run:
            return 0, "dry-run-output", ""
        limit = timeout if timeout is not None else self.context.timeout
        return self.run(
            command, self.context.env_vars, input_data, float(limit) if limit else None
        )

    def run(
        self,
        command: list[str],
        env: dict[str, str],
        input_data: str | None,
        timeout: float | None,
        literal: tuple[str, ...] = (),
    ) -> tuple[int, str, str]:
        """``execute`` once its options are settled: the one way a command runs."""
        result = self._session().run(
            command,
            cwd=self.context.working_dir or self.root,
            env=env,
            input=input_data,
            timeout=timeout,
            literal=literal,
        )
        stderr = result.stderr.decode(errors="replace")
        code = result.returncode
        if result.lost:
            stderr += "".join(f"topyaz-mount: error: {line}\n" for line in result.lost)
            code = code or EXIT_FAILURE  # as the CLI: a job whose outputs are lost failed
        return code, result.stdout.decode(errors="replace"), stderr

    def is_available(self) -> bool:
        """Can we connect and mount? (Connects if not yet connected.)"""
        if self.context.dry_run:
            return True
        try:
            self._session()
        except TopyazMountError:
            return False
        return True

    def get_info(self) -> dict[str, Any]:
        o = self.options
        info = {
            "type": "topyaz-mount",
            "version": __version__,
            "host": o.host,
            "user": o.user or "",
            "port": str(o.ssh_port),
            "root": self.root,
            "connected": str(bool(self._mount and self._mount.is_open)),
        }
        if self._mount is not None and self._mount.is_open:
            info["mountpoint"] = self._mount.to_remote(self.root)
        return info

    def close(self) -> None:
        if self._mount is not None:
            self._mount.close()
            self._mount = None

    def __enter__(self) -> MountExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
