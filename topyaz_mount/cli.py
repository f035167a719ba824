"""``topyaz-mount``: the command line.

Every failure of our own ends as one line on stderr and a non-zero status (2 for bad
usage, 255 when topyaz-mount itself failed, as ssh does); the remote command's own
status passes through unchanged. Tracebacks are for ``-vv`` only.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click
import trio

from . import __version__
from .client import RunResult, Session, open_session
from .errors import EXIT_FAILURE, TopyazMountError, UsageError, collapse
from .translate import (
    DEFAULT_PRODUCTS,
    PathMap,
    TranslationError,
    expand_product,
    translate_argv,
    translate_cwd,
    translate_env,
)
from .transport import Remote, SshSettings

log = logging.getLogger("topyaz_mount")


def _fail(message: str, code: int) -> int:
    click.echo(f"topyaz-mount: {message}", err=True)
    return code


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="topyaz-mount: %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name or not name.replace("_", "a").isalnum():
            raise UsageError(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _precheck(argv: list[str], root: str, cwd: str, env: dict[str, str], literal) -> None:
    """Find untranslatable paths before any connection is made."""
    pm = PathMap(root, "/topyaz-mount-precheck")
    translate_cwd(cwd, pm)
    translate_argv(argv, pm, cwd, literal=literal)
    translate_env(env, pm, cwd)


def _write(stream: Any) -> Callable[[bytes], None]:
    def sink(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return sink


async def _forward_signals(session: Session, abort: trio.CancelScope) -> None:
    """First Ctrl-C goes to the remote job, a second kills it, a third gives up."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                click.echo("topyaz-mount: stopping the remote command…", err=True)
                await session.signal(signum)
            elif count == 2:
                click.echo("topyaz-mount: killing the remote command…", err=True)
                await session.signal(signal.SIGKILL)
            else:
                abort.cancel()


async def _exec_async(
    settings: SshSettings,
    root: str,
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    forward_stdin: bool,
    literal: Sequence[str],
) -> RunResult | None:
    with trio.CancelScope() as abort:
        async with open_session(settings, root) as session:
            stdin = trio.lowlevel.FdStream(os.dup(0)) if forward_stdin else None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_forward_signals, session, abort)
                session.on_warning = lambda text: click.echo(
                    f"topyaz-mount: warning: {text}", err=True
                )
                result = await session.run(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdout=_write(sys.stdout.buffer),
                    stderr=_write(sys.stderr.buffer),
                    stdin=stdin,
                    literal=literal,
                )
                nursery.cancel_scope.cancel()
            return result
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="topyaz-mount")
def main() -> None:
    """Run Topaz (or any) commands on a remote GPU host over SSH, on your local files."""


@main.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--remote",
    "-r",
    envvar="TOPYAZ_MOUNT_REMOTE",
    required=True,
    metavar="[USER@]HOST[:PORT]",
    help="The GPU host to run on (ssh destination).",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Local directory to mount on the remote (default: the current directory).",
)
@click.option(
    "--ssh-option",
    "-o",
    "ssh_options",
    multiple=True,
    metavar="OPT",
    help="Passed to ssh as -o OPT (repeatable).",
)
@click.option("--ssh-config", "-F", default=None, help="ssh configuration file (ssh -F).")
@click.option(
    "--remote-python",
    default="python3",
    envvar="TOPYAZ_MOUNT_REMOTE_PYTHON",
    show_default=True,
    help="Python interpreter on the remote that has topyaz-mount.",
)
@click.option(
    "--env",
    "-e",
    "env_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="Environment for the command; values that are paths are translated.",
)
@click.option(
    "--stdin/--no-stdin",
    "forward_stdin",
    default=False,
    help="Forward local standard input to the command (default: /dev/null).",
)
@click.option(
    "--literal",
    multiple=True,
    metavar="ARG",
    help="Pass this argument through untranslated (repeatable).",
)
@click.option(
    "--photo-cmd",
    default=shlex.join(DEFAULT_PRODUCTS["photo"]),
    envvar="TOPYAZ_MOUNT_PHOTO_CMD",
    show_default=True,
    help="Remote program for `exec photo`.",
)
@click.option(
    "--giga-cmd",
    default=shlex.join(DEFAULT_PRODUCTS["giga"]),
    envvar="TOPYAZ_MOUNT_GIGA_CMD",
    show_default=True,
    help="Remote program for `exec giga`.",
)
@click.option(
    "--video-cmd",
    default=shlex.join(DEFAULT_PRODUCTS["video"]),
    envvar="TOPYAZ_MOUNT_VIDEO_CMD",
    show_default=True,
    help="Remote program for `exec video`.",
)
@click.option("--verbose", "-v", count=True, help="-v: progress; -vv: debug.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(
    remote: str,
    root: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str,
    env_pairs: tuple[str, ...],
    forward_stdin: bool,
    literal: tuple[str, ...],
    photo_cmd: str,
    giga_cmd: str,
    video_cmd: str,
    verbose: int,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND on the remote host with the local root mounted there.

    \b
    topyaz-mount exec --remote gpu-box -- tpai ./shots/a.jpg -o ./out/
    topyaz-mount exec --remote gpu-box photo shots/a.jpg
    """
    _setup_logging(verbose)
    sys.exit(
        _exec(
            remote,
            root,
            ssh_options,
            ssh_config,
            remote_python,
            env_pairs,
            forward_stdin,
            literal,
            {"photo": photo_cmd, "giga": giga_cmd, "video": video_cmd},
            verbose,
            list(command),
        )
    )


def _exec(
    remote: str,
    root: str | None,
    ssh_options: Sequence[str],
    ssh_config: str | None,
    remote_python: str,
    env_pairs: Sequence[str],
    forward_stdin: bool,
    literal: Sequence[str],
    product_cmds: dict[str, str],
    verbose: int,
    command: list[str],
) -> int:
    try:
        products = {name: shlex.split(cmd) for name, cmd in product_cmds.items()}
        argv = expand_product(command, products)
        cwd = os.getcwd()
        root_dir = os.path.realpath(root or cwd)
        if not os.path.isdir(root_dir):
            raise UsageError(f"--root {root}: not a directory")
        env = _parse_env(env_pairs)
        _precheck(argv, root_dir, cwd, env, literal)
        settings = SshSettings(
            Remote.parse(remote),
            tuple(ssh_options),
            ssh_config,
            remote_python,
            agent_log_level="INFO" if verbose else "WARNING",
        )
        result = trio.run(_exec_async, settings, root_dir, argv, cwd, env, forward_stdin, literal)
    except TranslationError as e:
        return _fail(str(e), 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BaseException as e:  # noqa: BLE001 - the one place errors become exit codes
        err = collapse(e)
        if isinstance(err, TopyazMountError):
            return _fail(str(err), err.exit_code)
        if isinstance(err, (SystemExit, KeyboardInterrupt)):
            raise
        if verbose >= 2:
            log.exception("internal error")
        return _fail(
            f"internal error: {type(err).__name__}: {err} (run with -vv for details)", EXIT_FAILURE
        )
    if result is None:
        return _fail("aborted; the remote session was torn down", 130)
    for line in result.lost:
        click.echo(f"topyaz-mount: error: {line}", err=True)
    if result.lost and result.exit_code == 0:
        return EXIT_FAILURE
    return result.exit_code


if __name__ == "__main__":
    main()
