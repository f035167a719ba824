"""The library way in: run commands on a remote host through the mount from Python.

Two faces over one session object:

- trio code: ``async with open_remote(host, root) as remote: await remote.run(argv)``
- plain synchronous code: ``with RemoteMount(host, root) as remote: remote.run(argv)``,
  which runs the trio side in a thread of its own, so the caller never sees trio.

Commands in one session run one after another over one ssh connection and one mount.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .client import progress
from .client.config import HostOptions, host_settings
from .client.session import Session, open_session
from .client.translate import PathMap
from .client.transport import Remote, SshSettings
from .errors import collapse
from .policy import Policy, PolicyOptions
from .waiting import first_of


@dataclass(frozen=True)
class RemoteHost:
    """Where to run: an ssh destination plus how to reach it."""

    host: str
    user: str | None = None
    port: int | None = None
    ssh_key: str | None = None
    ssh_options: tuple[str, ...] = ()
    ssh_config: str | None = None
    remote_python: str | None = None  # None: the host's profile (from `setup`), else python3
    connection_timeout: float = 30.0
    # How the job sees the root: "fuse", "stage" or "auto" (None: the host's profile,
    # else auto: FUSE where a mount works, else the inputs are staged).
    backend: str | None = None
    # How long the remote session outlives a lost connection while the client
    # reconnects ("15m"; "0": off); None: the host's profile, else 15 minutes.
    grace: str | None = None

    @classmethod
    def parse(cls, destination: str, **kwargs: Any) -> RemoteHost:
        r = Remote.parse(destination)
        return cls(r.host, kwargs.pop("user", r.user), kwargs.pop("port", r.port), **kwargs)

    def settings(self) -> SshSettings:
        options = list(self.ssh_options)
        if self.ssh_key:
            options += [f"IdentityFile={os.path.expanduser(self.ssh_key)}", "IdentitiesOnly=yes"]
        options.append(f"ConnectTimeout={max(1, int(self.connection_timeout))}")
        flags = HostOptions(
            remote_python=self.remote_python,
            ssh_options=tuple(options),
            ssh_config=self.ssh_config,
            backend=self.backend,
            grace=self.grace,
        )
        settings, _ = host_settings(Remote(self.host, self.user, self.port), flags)
        return settings


@dataclass
class CompletedRun:
    """What a command left behind: its status and its captured output."""

    returncode: int
    stdout: bytes
    stderr: bytes
    lost: list[str] = field(default_factory=list)
    stats: dict[str, int | float | str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


class AsyncRemote:
    """A session for trio code; get one from ``open_remote``."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._lock = trio.Lock()

    @property
    def root(self) -> Path:
        return self._session.root

    @property
    def mountpoint(self) -> str:
        return self._session.mountpoint

    def to_remote(self, local_path: str | os.PathLike[str]) -> str:
        """The remote path of a local path under the root (ValueError outside it)."""
        pm: PathMap = self._session.pathmap  # type: ignore[assignment]
        path = os.path.abspath(local_path)
        remote = pm.to_remote(path)
        if remote is None:
            raise ValueError(f"{path} is outside the root {pm.local_root}")
        return remote

    def to_local(self, remote_path: str) -> str:
        """The local path of a remote path under the mountpoint (ValueError outside it)."""
        pm: PathMap = self._session.pathmap  # type: ignore[assignment]
        local = pm.to_local(remote_path)
        if local is None:
            raise ValueError(f"{remote_path} is outside the mountpoint {pm.remote_root}")
        return local

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        literal: Sequence[str] = (),
        on_progress: progress.Callback | None = None,
        progress_interval: float = 1.0,
    ) -> CompletedRun:
        """Run ``argv`` remotely; paths under the root are translated both in ``argv``
        and in ``env`` values, except the arguments listed in ``literal``. Output is
        captured, and also streamed to ``on_stdout`` / ``on_stderr`` if given. Raises
        ``JobTimeout`` after killing the command when ``timeout`` runs out.
        ``on_progress`` gets a ``progress.Progress`` every ``progress_interval`` seconds
        and a last one (phase ``done``) whose figures are the result's ``stats``."""
        out: list[bytes] = []
        err: list[bytes] = []
        callback_errors: list[BaseException] = []

        def guarded(cb: Callable[[Any], None] | None) -> Callable[[Any], None]:
            def call(value: Any) -> None:
                if cb is not None and not callback_errors:
                    try:
                        cb(value)
                    except Exception as e:  # the caller's bug: report it, keep the session
                        callback_errors.append(e)

            return call

        def tee(buf: list[bytes], cb: Callable[[bytes], None] | None) -> Callable[[bytes], None]:
            forward = guarded(cb)

            def sink(data: bytes) -> None:
                buf.append(data)
                forward(data)

            return sink

        data = input.encode() if isinstance(input, str) else input
        report = guarded(on_progress)
        async with self._lock:
            tracker = progress.Tracker(self._session.server)
            tracker.phase = "running"
            # In the session's nursery, not one of ours: the caller's errors (a
            # TranslationError) must come out as themselves, not in an exception group.
            watching = trio.CancelScope()

            async def watch() -> None:
                with watching:
                    await progress.watch(tracker, report, progress_interval)

            if on_progress is not None:
                self._session.nursery.start_soon(watch)
            try:
                result = await self._session.run(
                    list(argv),
                    cwd=os.fspath(cwd) if cwd is not None else None,
                    env=dict(env or {}),
                    stdout=tee(out, on_stdout),
                    stderr=tee(err, on_stderr),
                    stdin=data,
                    timeout=timeout,
                    literal=literal,
                )
            finally:
                watching.cancel()
            if on_progress is not None:
                progress.finish(tracker, report)
        if callback_errors:
            raise callback_errors[0]
        return CompletedRun(
            result.exit_code,
            b"".join(out),
            b"".join(err),
            result.lost,
            result.stats,
            result.refused,
        )

    async def changed(self, local_paths: Sequence[str | os.PathLike[str]]) -> None:
        """Tell the remote these paths under the root changed here, so the next command
        sees them at once, not after the few seconds its caches may keep the old state."""
        pm: PathMap = self._session.pathmap  # type: ignore[assignment]
        rel = (pm.relative(os.path.abspath(p)) for p in local_paths)
        await self._session.invalidate([os.fsencode(r) for r in rel if r])

    @property
    def connected(self) -> bool:
        return not self._session.lost.is_set()

    @property
    def backend(self) -> str:
        """How the remote shows the job the root: "fuse" or "stage"."""
        return self._session.backend


@asynccontextmanager
async def open_remote(
    host: RemoteHost | str,
    root: str | os.PathLike[str] | None = None,
    policy: PolicyOptions | None = None,
) -> AsyncIterator[AsyncRemote]:
    """Connect to ``host`` and mount ``root`` (default: the current directory) there.

    ``policy``: what the remote may write and see (default: the default rules)."""
    remote = host if isinstance(host, RemoteHost) else RemoteHost.parse(host)
    settings = remote.settings()
    try:
        async with open_session(
            settings,
            os.fspath(root or os.getcwd()),
            connect_timeout=remote.connection_timeout,
            policy=Policy.from_options(policy or PolicyOptions()),
        ) as session:
            yield AsyncRemote(session)
    except BaseException as e:
        # trio wraps whatever leaves a nursery in an ExceptionGroup; callers want the
        # error itself (ours, or their own from inside the block).
        err = collapse(e)
        if err is not e:
            raise err from None
        raise


class RemoteMount:
    """The same session for synchronous code: trio runs in a thread of its own.

    ``with RemoteMount("gpu-box", "/photos") as remote: remote.run(["tpai", ...])``
    """

    def __init__(
        self,
        host: RemoteHost | str,
        root: str | os.PathLike[str] | None = None,
        policy: PolicyOptions | None = None,
    ) -> None:
        self.host = host if isinstance(host, RemoteHost) else RemoteHost.parse(host)
        self.root = os.fspath(root or os.getcwd())
        self.policy = policy
        self._token: trio.lowlevel.TrioToken | None = None
        self._remote: AsyncRemote | None = None
        self._close: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RemoteMount:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return (
            self._remote is not None
            and self._remote.connected
            and self._thread is not None
            and self._thread.is_alive()
        )

    def open(self) -> None:
        if self.is_open:
            return
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._main, name="topyaz-mount", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join()
            raise error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as e:  # reported to the caller of open()
            self._error = collapse(e)
        finally:
            self._remote = None
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._close = trio.Event()
        async with open_remote(self.host, self.root, self.policy) as remote:
            self._remote = remote
            self._ready.set()
            # End on close() or when the connection dies, whichever comes first.
            await first_of(self._close, remote._session.lost)

    def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        if self._token is not None and self._close is not None and thread.is_alive():
            try:
                trio.from_thread.run_sync(self._close.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        thread.join()
        self._thread = None
        self._remote = None

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.is_open:
            raise RuntimeError("the remote session is not open")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except BaseException as e:
            raise collapse(e) from None

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        literal: Sequence[str] = (),
        on_progress: progress.Callback | None = None,
        progress_interval: float = 1.0,
    ) -> CompletedRun:
        """See ``AsyncRemote.run``; ``on_progress`` is called in the session's thread."""
        assert self._remote is not None or not self.is_open
        remote = self._remote

        async def go() -> CompletedRun:
            assert remote is not None
            return await remote.run(
                argv,
                cwd=cwd,
                env=env,
                input=input,
                timeout=timeout,
                literal=literal,
                on_progress=on_progress,
                progress_interval=progress_interval,
            )

        return self._call(go)

    def changed(self, local_paths: Sequence[str | os.PathLike[str]]) -> None:
        """See ``AsyncRemote.changed``."""
        remote = self._remote

        async def go() -> None:
            assert remote is not None
            await remote.changed(local_paths)

        self._call(go)

    def to_remote(self, local_path: str | os.PathLike[str]) -> str:
        if self._remote is None:
            raise RuntimeError("the remote session is not open")
        return self._remote.to_remote(local_path)

    def to_local(self, remote_path: str) -> str:
        if self._remote is None:
            raise RuntimeError("the remote session is not open")
        return self._remote.to_local(remote_path)
