"""Errors a user sees as one line, each with the exit status it maps to."""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_FAILURE = 255  # like ssh: topyaz-mount itself failed, not the remote command


def exit_status(code: int) -> tuple[int, str | None]:
    """The local exit status for the remote command's, and a note if it had to change.

    A process exits 0-255, and death by signal N is 128+N (the shell's convention; the
    agent reports it so). Anything else came from a broken or hostile agent: it is 255,
    never the value modulo 256, so 256 cannot pass for success.
    """
    if 0 <= code <= 255:
        return code, None
    return EXIT_FAILURE, f"the remote reported exit status {code}, not 0-255; exiting 255"


class TopyazMountError(Exception):
    exit_code = EXIT_FAILURE


class UsageError(TopyazMountError):
    exit_code = EXIT_USAGE


class ConnectionFailed(TopyazMountError):
    """ssh could not reach the host or the connection broke."""


class AuthenticationFailed(ConnectionFailed):
    """The host refused our credentials."""


class AgentUnavailable(TopyazMountError):
    """ssh worked but the agent could not start (package, Python or FUSE missing)."""


class RemoteCommandFailed(TopyazMountError):
    """The command could not be started on the remote host."""


class JobTimeout(TopyazMountError):
    """The command ran past its time limit and was killed."""

    exit_code = 124


def collapse(exc: BaseException) -> BaseException:
    """The error to report from a (possibly nested) exception group.

    trio wraps errors raised inside nurseries in groups; the user wants the one that
    says what went wrong, which is ours if there is one.
    """
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        subs = getattr(e, "exceptions", None)
        if (
            subs is not None
            and isinstance(e, BaseException)
            and type(e).__name__.endswith("ExceptionGroup")
        ):
            for sub in subs:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    for leaf in leaves:
        if isinstance(leaf, TopyazMountError):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt):
            return leaf
    return leaves[0] if leaves else exc
