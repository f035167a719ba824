"""``topyaz-mount``: the command line.

Every failure of our own ends as one line on stderr and a non-zero status (2 for bad
usage, 255 when topyaz-mount itself failed, as ssh does); the remote command's own
status passes through unchanged. Tracebacks are for ``-vv`` only.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import __version__
from .client.config import (
    BACKENDS,
    DEFAULT_GRACE,
    HostOptions,
    config_path,
    host_settings,
    human_size,
    load_profile,
    parse_duration,
    parse_size,
    resolve,
    save_profile,
)
from .client.jail import checked_root
from .client.progress import LogHandler, aside
from .client.translate import (
    DEFAULT_PRODUCTS,
    PathMap,
    TranslationError,
    expand_product,
    translate_argv,
    translate_cwd,
    translate_env,
)
from .client.transport import Remote, SshSettings, run_remote_json, spawn_ssh
from .errors import (
    EXIT_FAILURE,
    AgentUnavailable,
    TopyazMountError,
    UsageError,
    collapse,
    exit_status,
)
from .policy import Policy, PolicyOptions
from .safetext import printable

if TYPE_CHECKING:
    from .client import control
    from .client.session import RunResult

log = logging.getLogger("topyaz_mount")


def _fail(message: str, code: int) -> int:
    _say(message)
    return code


class _PrintableFormatter(logging.Formatter):
    """Log lines carry remote text (the agent's messages, names): shown as escapes."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802 - a traceback's lines, for -vv
        return "\n".join(printable(line) for line in super().formatException(ei).splitlines())


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = LogHandler(sys.stderr)  # steps around the live progress line
    handler.setFormatter(_PrintableFormatter("topyaz-mount: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


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


def _stats_line(stats: dict) -> str:
    return (
        f"sent {human_size(stats.get('content_bytes_sent', 0))} of content, "
        f"received {human_size(stats.get('content_bytes_received', 0))} in "
        f"{stats.get('files_committed', 0)} outputs; cache {stats.get('cache_hits', 0)} hits, "
        f"{stats.get('cache_misses', 0)} misses, saved {human_size(stats.get('bytes_saved', 0))}; "
        f"wire {human_size(stats.get('wire_bytes_sent', 0))} up, "
        f"{human_size(stats.get('wire_bytes_received', 0))} down; "
        f"{stats.get('wall_seconds', 0):.2f} s"
        + (f"; {stats['backend']} backend" if stats.get("backend") else "")
    )


def _decorated(fn: Callable[..., Any], options: list[Callable]) -> Callable[..., Any]:
    """``fn`` with click ``options``, listed in the order ``--help`` shows them."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def remote_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command that talks to a remote host shares."""
    options = [
        click.option(
            "--remote",
            "-r",
            envvar="TOPYAZ_MOUNT_REMOTE",
            default=None,
            metavar="[USER@]HOST[:PORT]",
            help="The GPU host (ssh destination; or set TOPYAZ_MOUNT_REMOTE).",
        ),
        click.option(
            "--ssh-option",
            "-o",
            "ssh_options",
            multiple=True,
            metavar="OPT",
            help="Passed to ssh as -o OPT (repeatable).",
        ),
        click.option("--ssh-config", "-F", default=None, help="ssh configuration file (ssh -F)."),
        click.option(
            "--remote-python",
            default=None,
            envvar="TOPYAZ_MOUNT_REMOTE_PYTHON",
            help="Python on the remote that has topyaz-mount (default: the host's "
            "profile from `setup`, else python3).",
        ),
        click.option(
            "--cache-cap",
            default=None,
            envvar="TOPYAZ_MOUNT_CACHE_CAP",
            metavar="SIZE",
            help="Size cap of the remote content cache (e.g. 20G; default: a quarter "
            "of the free space, at most 50G).",
        ),
        click.option("--verbose", "-v", count=True, help="-v: progress; -vv: debug."),
    ]
    return _decorated(fn, options)


def progress_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What a command shows of its transfer: ``exec`` and ``shell`` share these."""
    options = [
        stats_option,
        click.option(
            "--quiet",
            "-q",
            is_flag=True,
            help="No live progress (shown on stderr when it is a terminal).",
        ),
        click.option(
            "--json-progress",
            is_flag=True,
            help="Progress as one JSON object a second on stderr, terminal or not.",
        ),
    ]
    return _decorated(fn, options)


bwlimit_option = click.option(
    "--bwlimit",
    default=None,
    metavar="RATE",
    help="Use at most RATE bytes a second of the link (10M, 500k; UP:DOWN for each way, "
    "e.g. 1M:10M; default: the host's profile, else no limit).",
)


def policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The write policy's options (see policy.py), handed on as one ``policy`` argument."""

    @functools.wraps(fn)
    def with_policy(
        *args: Any,
        protect: tuple[str, ...],
        hide: tuple[str, ...],
        allow_write: tuple[str, ...],
        read_only: bool,
        allow_home: bool,
        **kwargs: Any,
    ) -> Any:
        options = PolicyOptions(protect, hide, allow_write, read_only, allow_home)
        return fn(*args, policy=options, **kwargs)

    options = [
        click.option(
            "--protect",
            multiple=True,
            metavar="PATTERN",
            help="Also refuse the remote any change to paths matching PATTERN (repeatable).",
        ),
        click.option(
            "--hide",
            multiple=True,
            metavar="PATTERN",
            help="Also hide paths matching PATTERN from the remote (repeatable).",
        ),
        click.option(
            "--allow-write",
            multiple=True,
            metavar="PATTERN",
            help="Lift the protection rule PATTERN (e.g. .envrc; repeatable).",
        ),
        click.option(
            "--read-only", is_flag=True, help="The remote may read the root but write nothing."
        ),
        click.option(
            "--allow-home",
            is_flag=True,
            help="Allow the root to be your home directory (or an ancestor of it).",
        ),
    ]
    return _decorated(with_policy, options)


def _policy_argv(options: PolicyOptions) -> list[str]:
    """The same options as command-line flags (for the detached session process)."""
    argv = []
    for flag, patterns in (
        ("--protect", options.protect),
        ("--hide", options.hide),
        ("--allow-write", options.allow_write),
    ):
        for pattern in patterns:
            argv += [flag, pattern]
    return argv + ["--read-only"] * options.read_only + ["--allow-home"] * options.allow_home


def _profile(remote: str | None, flags: HostOptions) -> HostOptions:
    """``flags`` over the host's profile (written by ``setup``) over the defaults."""
    return resolve(flags, load_profile(str(Remote.parse(remote))) if remote else None)


def backend_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--backend``: how the remote shows the job the root (agent/backend.py)."""
    return click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default=None,
        envvar="TOPYAZ_MOUNT_BACKEND",
        help="fuse: mount the root; stage: copy the inputs over and the outputs back "
        "(hosts without FUSE); auto: FUSE where a mount works (default: the host's "
        "profile, else auto).",
    )(fn)


def stats_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--stats``: the command's transfer summary on stderr (exec, attach)."""
    return click.option(
        "--stats",
        "stats_format",
        is_flag=False,
        flag_value="text",
        default=None,
        type=click.Choice(["text", "json"]),
        help="Print a transfer summary on stderr (--stats, or --stats=json).",
    )(fn)


def grace_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--grace``: how long the remote session outlives a lost link (reconnect.py)."""
    return click.option(
        "--grace",
        default=None,
        envvar="TOPYAZ_MOUNT_GRACE",
        metavar="DURATION",
        help="Keep the remote session (job, mount, outputs) this long after the link is "
        "lost, and reconnect to it (e.g. 15m; 0: end with the link; default: the host's "
        "profile, else 15m).",
    )(fn)


def _settings(
    remote: str | None,
    ssh_options: Sequence[str],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    backend: str | None = None,
    grace: str | None = None,
    bwlimit: str | None = None,
) -> SshSettings:
    if not remote:
        raise UsageError("missing --remote HOST (or set TOPYAZ_MOUNT_REMOTE)")
    flags = HostOptions(
        remote_python=remote_python,
        ssh_options=tuple(ssh_options),
        ssh_config=ssh_config,
        cache_cap=cache_cap,
        backend=backend,
        grace=grace,
        bwlimit=bwlimit,
    )
    settings, _ = host_settings(
        Remote.parse(remote), flags, agent_log_level="INFO" if verbose else "WARNING"
    )
    return settings


def _agent_json(settings: SshSettings, *mode: str) -> dict:
    """Run the agent in one of its one-shot modes (cache, doctor); its JSON answer."""
    return run_remote_json(replace(settings, agent_args=(*settings.agent_args, *mode)))


def _report(err: BaseException, verbose: int) -> int:
    """The one place an exception becomes a line on stderr and an exit status."""
    err = collapse(err)
    if isinstance(err, TranslationError):
        return _fail(str(err), 2)
    if isinstance(err, TopyazMountError):
        return _fail(str(err), err.exit_code)
    if isinstance(err, KeyboardInterrupt):
        return _fail("interrupted", 130)
    if isinstance(err, SystemExit):
        raise err
    if verbose >= 2:
        log.error("internal error", exc_info=err)
    return _fail(
        f"internal error: {type(err).__name__}: {err} (run with -vv for details)", EXIT_FAILURE
    )


class PassThroughCommand(click.Command):
    """A command whose trailing COMMAND runs on the remote as typed.

    Unknown options must pass through to the remote command, so click is told to ignore
    them; but a mistyped option of ours before the command (``--backnd stage -- cmd``)
    would then run on the host as the program ``--backnd``. A command that starts with a
    dash must therefore come after ``--``; otherwise it is a usage error, with the
    option we think was meant.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # What is left once our options are taken, before click checks anything else
        # (a missing required option would otherwise hide the typo that caused it).
        opts, _, _ = self.make_parser(ctx).parse_args(args=list(args))
        command = opts.get("command")
        if not isinstance(command, (list, tuple)):  # absent: click's own "unset" marker
            command = ()
        if command and command[0].startswith("-") and command[0] != "-":
            before = args[len(args) - len(command) - 1] if len(args) > len(command) else ""
            if before != "--":
                word = command[0].split("=", 1)[0]
                known = [n for p in self.params for n in getattr(p, "opts", ()) if n[0] == "-"]
                close = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
                hint = f" (did you mean {close[0]}?)" if close else ""
                click.echo(
                    f"topyaz-mount: {self.name}: no such option {printable(word)}{hint}; "
                    "a command that starts with a dash goes after --",
                    err=True,
                )
                ctx.exit(2)
        return super().parse_args(ctx, args)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="topyaz-mount")
def main() -> None:
    """Run Topaz (or any) commands on a remote GPU host over SSH, on your local files."""


@main.command(
    "exec",
    cls=PassThroughCommand,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@remote_options
@backend_option
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Local directory to mount on the remote (default: the current directory).",
)
@click.option(
    "--include",
    "includes",
    multiple=True,
    metavar="PATH",
    help="Also an input, though no argument names it (a file or a directory; "
    "repeatable). The stage backend copies over only the inputs it knows of.",
)
@click.option(
    "--session",
    "session_name",
    default=None,
    metavar="NAME",
    help="Run through the long-lived session NAME (see `mount`) instead of connecting.",
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
@progress_options
@bwlimit_option
@click.option(
    "--photo-cmd",
    default=None,
    envvar="TOPYAZ_MOUNT_PHOTO_CMD",
    help="Remote program for `exec photo` (default: the host's profile, else "
    f"`{shlex.join(DEFAULT_PRODUCTS['photo'])}`).",
)
@click.option(
    "--giga-cmd",
    default=None,
    envvar="TOPYAZ_MOUNT_GIGA_CMD",
    help="Remote program for `exec giga` (default: the host's profile, else "
    f"`{shlex.join(DEFAULT_PRODUCTS['giga'])}`).",
)
@click.option(
    "--video-cmd",
    default=None,
    envvar="TOPYAZ_MOUNT_VIDEO_CMD",
    help="Remote program for `exec video` (default: the host's profile, else "
    f"`{shlex.join(DEFAULT_PRODUCTS['video'])}`).",
)
@grace_option
@click.option(
    "--persist",
    default=None,
    envvar="TOPYAZ_MOUNT_PERSIST",
    metavar="DURATION",
    help="Keep this command's session up this long after it, for the next exec on the "
    "same host and root to reuse (0: end with the command; default: the host's profile, "
    "else 5m).",
)
@policy_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(
    remote: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    backend: str | None,
    root: str | None,
    includes: tuple[str, ...],
    session_name: str | None,
    env_pairs: tuple[str, ...],
    forward_stdin: bool,
    literal: tuple[str, ...],
    stats_format: str | None,
    quiet: bool,
    json_progress: bool,
    bwlimit: str | None,
    photo_cmd: str | None,
    giga_cmd: str | None,
    video_cmd: str | None,
    grace: str | None,
    persist: str | None,
    command: tuple[str, ...],
    policy: PolicyOptions,
) -> None:
    """Run COMMAND on the remote host with the local root mounted there.

    \b
    topyaz-mount exec --remote gpu-box -- tpai ./shots/a.jpg -o ./out/
    topyaz-mount exec --remote gpu-box photo shots/a.jpg
    """
    _setup_logging(verbose)
    try:
        opts = _profile(
            remote,
            HostOptions(
                photo_cmd=photo_cmd,
                giga_cmd=giga_cmd,
                video_cmd=video_cmd,
                include=includes,
                persist=persist,
            ),
        )
        products = {
            "photo": shlex.split(opts.photo_cmd or ""),
            "giga": shlex.split(opts.giga_cmd or ""),
            "video": shlex.split(opts.video_cmd or ""),
        }
        argv = expand_product(list(command), products)
        cwd = os.getcwd()
        env = _parse_env(env_pairs)
        if session_name is not None:
            from .client import control, runtime, session_exec

            if root is not None:
                raise UsageError("--root cannot be used with --session (the session has one)")
            if backend is not None:
                raise UsageError("--backend belongs to `mount`: a session has one backend")
            if policy != PolicyOptions():
                raise UsageError(
                    "--protect, --hide, --allow-write, --read-only and --allow-home belong to "
                    "`mount`: a session's commands share its policy"
                )
            source = click.get_current_context().get_parameter_source("grace")
            if source is click.core.ParameterSource.COMMANDLINE:
                raise UsageError("--grace belongs to `mount`: a session's commands share it")
            if bwlimit is not None:
                raise UsageError(
                    "--bwlimit belongs to `mount`: a session's commands share its link"
                )
            runtime.check_name(session_name)
            req = control.Exec(
                argv, cwd, env, forward_stdin, list(literal), includes=_absolute(includes)
            )
            display = _progress_display(quiet, json_progress)
            done = session_exec.run(session_name, req, _say, display=display)
        else:
            rules = Policy.from_options(policy)
            root_dir = str(checked_root(root or cwd, policy.allow_home))
            _precheck(argv, root_dir, cwd, env, literal)
            settings = _settings(
                remote,
                ssh_options,
                ssh_config,
                remote_python,
                cache_cap,
                verbose,
                backend=backend,
                grace=grace,
                bwlimit=bwlimit,
            )
            job = (argv, cwd, env, forward_stdin, literal, _absolute(opts.include or ()))
            persist_for = parse_duration(opts.persist or "0")
            display = _progress_display(quiet, json_progress)
            # --json-progress is a program's feed, which only a session of its own gives.
            found = (
                None
                if display == "json"
                else _exec_persisted(settings, root_dir, policy, rules, persist_for, job, display)
            )
            if found is None:
                _exec_oneshot(settings, root_dir, rules, job, display, stats_format)
            done = found
    except BaseException as e:  # noqa: BLE001 - errors become one line and a status
        sys.exit(_report(e, verbose))
    _finish_session(done, stats_format)


# argv, cwd, env, forward stdin, literal arguments, includes (absolute)
Command = tuple[list[str], str, dict[str, str], bool, Sequence[str], list[str]]


def _exec_persisted(
    settings: SshSettings,
    root_dir: str,
    options: PolicyOptions,
    rules: Policy,
    persist_for: float,
    command: Command,
    display: str | None = None,
) -> control.Finished | None:
    """The command through a compatible session that is up, or one started for it that
    stays ``persist_for`` seconds after it (persist.py); None: run it one-shot.
    ``display``: its live progress, as for a one-shot exec."""
    # Only persist here: with no session to reuse, ssh starts next (control, msgspec
    # and session_exec are imported once a session is found).
    from .client import persist

    argv, cwd, env, forward_stdin, literal, includes = command
    key = persist.reuse_key(settings, root_dir, options)
    for _ in range(3):  # a session found may be ending, or gone
        name = persist.find(key)
        if name is None:
            if persist_for <= 0:
                return None
            with persist.locked():
                name = persist.find(key) or _start_persisted(
                    settings, root_dir, rules, key, persist_for, (argv, cwd)
                )
        from .client import control, session_exec

        req = control.Exec(argv, cwd, env, forward_stdin, list(literal), includes=includes)
        # Passed over: a session that is gone, or took no command (never a command run).
        try:
            sock = session_exec.connect(name)
        except control.ControlError:
            persist.forget(name)
            continue
        try:
            return session_exec.run(name, req, _say, sock=sock, display=display)
        except session_exec.SessionEnding:
            persist.forget(name)
    return None


def _start_persisted(
    settings: SshSettings,
    root_dir: str,
    rules: Policy,
    key: str,
    persist_for: float,
    first_command: tuple[Sequence[str], str],
) -> str:
    """Fork the session an exec leaves behind; its name once it listens."""
    from .client import persist

    name = persist.session_name(root_dir, key)

    def serve(ready_fd: int) -> None:
        _serve_session(
            settings,
            root_dir,
            name,
            rules,
            (),
            ready_fd=ready_fd,
            key=key,
            idle=persist_for,
            first_command=first_command,
        )

    info = persist.start(name, serve)
    if not info.get("ok"):
        from .client.session_exec import SessionCommandFailed

        raise SessionCommandFailed(str(info.get("error")), int(info.get("code") or EXIT_FAILURE))
    return name


def _exec_oneshot(
    settings: SshSettings,
    root_dir: str,
    rules: Policy,
    command: Command,
    display: str | None,
    stats_format: str | None,
) -> NoReturn:
    """One connection, one mount, one command, all torn down (oneshot.py); exits."""
    argv, cwd, env, forward_stdin, literal, includes = command
    # Connect first; the rest of the client is imported while ssh connects.
    spawned = spawn_ssh(settings)
    try:
        import trio

        from .client.oneshot import exec_async
    except BaseException:
        spawned.kill()
        raise
    result = trio.run(
        exec_async,
        settings,
        root_dir,
        argv,
        cwd,
        env,
        forward_stdin,
        literal,
        spawned,
        rules,
        includes,
        display,
    )
    _finish(result, stats_format)
    raise AssertionError("unreachable")


def _absolute(paths: Sequence[str]) -> list[str]:
    return [os.path.abspath(os.path.expanduser(p)) for p in paths]


def _progress_display(quiet: bool, json_progress: bool) -> str | None:
    """How the live progress is shown: JSON when asked, a line on a terminal, else none."""
    if json_progress:
        if quiet:
            raise UsageError("--quiet and --json-progress do not go together")
        return "json"
    return "line" if not quiet and sys.stderr.isatty() else None


def _say(text: str) -> None:
    """One line of ours on stderr; any remote text in it is shown as escapes."""
    with aside():  # around the live progress line, if one is shown
        click.echo(f"topyaz-mount: {printable(text)}", err=True)


def _finish(result: RunResult | None, stats_format: str | None = None) -> None:
    """Report a finished command the same way whichever way it ran; exit with its status."""
    if result is None:
        sys.exit(_fail("aborted; the remote session was torn down", 130))
    _conclude(result.exit_code, result.lost, result.refused, result.stats, stats_format)


def _finish_session(done: control.Finished, stats_format: str | None = None) -> None:
    """The same for a command a session ran (no client, no trio imported for it)."""
    _conclude(done.code, done.lost, done.refused, done.stats, stats_format)


def _conclude(
    exit_code: int,
    lost: Sequence[str],
    refused: Sequence[str],
    stats: dict,
    stats_format: str | None,
) -> None:
    for line in lost:
        _say(f"error: {line}")
    for line in refused:
        _say(line)
    if stats_format == "json":
        click.echo(json.dumps(stats, sort_keys=True), err=True)
    elif stats_format == "text":
        _say(_stats_line(stats))
    code, note = exit_status(exit_code)
    if note is not None:
        _say(f"error: {note}")
    _leave(EXIT_FAILURE if lost and code == 0 else code)


def _leave(code: int) -> NoReturn:
    """End an exec's process at once: its outputs are committed and its files closed,
    and the interpreter's own teardown (freeing trio and the client's modules) was
    30 ms of every exec. Inside another program (click's test runner), a plain exit."""
    if os.path.basename(sys.argv[0]) != "topyaz-mount":
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: what it would not take is lost either way
    logging.shutdown()
    os._exit(code)


@main.command("cache")
@remote_options
@click.option("--clear", is_flag=True, help="Remove every cached object not in use.")
@click.option(
    "--prune",
    "prune_to",
    default=None,
    metavar="SIZE",
    help="Evict least recently used objects until the cache is at most SIZE.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def cache_(
    remote: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    clear: bool,
    prune_to: str | None,
    as_json: bool,
) -> None:
    """Show (and prune or clear) the remote host's content cache."""
    _setup_logging(verbose)
    try:
        settings = _settings(remote, ssh_options, ssh_config, remote_python, cache_cap, verbose)
        extra = ["--cache-stats"] + (["--clear"] if clear else [])
        if prune_to is not None:
            extra += ["--prune-to", str(parse_size(prune_to))]
        out = _agent_json(settings, *extra)
        if as_json:
            click.echo(json.dumps(out, sort_keys=True))
            return
        _show_cache(out, settings.remote, clear or prune_to is not None)
    except BaseException as e:  # noqa: BLE001 - also an agent's answer of the wrong shape
        sys.exit(_report(e, verbose))


def _show_cache(out: dict, remote: Remote, freed: bool) -> None:
    lines = [
        f"cache at {out['path']} on {remote}",
        f"  objects  {out['objects']}",
        f"  size     {human_size(out['bytes'])} of {human_size(out['cap'])} cap",
        f"  hit rate {out['hit_rate'] * 100:.1f} % ({out['hits']} hits, "
        f"{out['misses']} misses), {human_size(out['bytes_saved'])} not sent again",
    ]
    if out.get("kept_bytes"):
        lines.append(
            f"  kept     {human_size(out['kept_bytes'])} of outputs not committed, sharing "
            f"the cap (see `topyaz-mount kept`)"
        )
    if freed:
        lines.append(f"  freed    {human_size(out['freed'])}")
    for line in lines:  # the agent's answer: shown as escapes where it is not text
        click.echo(printable(line))


@main.command("kept")
@remote_options
@click.option(
    "--recover",
    is_flag=True,
    help="Commit the complete kept outputs of --root home (verified; a local file "
    "changed since is not overwritten).",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="With --recover: the local root the outputs belong to (default: the current directory).",
)
@click.option("--clear", is_flag=True, help="Remove kept outputs (all, or --session).")
@click.option("--session", "session_id", default=None, metavar="ID", help="With --clear.")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def kept_(
    remote: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str,
    cache_cap: str | None,
    verbose: int,
    recover: bool,
    root: str | None,
    clear: bool,
    session_id: str | None,
    as_json: bool,
) -> None:
    """List the outputs a failed session kept on the remote host; recover or clear them."""
    _setup_logging(verbose)
    try:
        settings = _settings(remote, ssh_options, ssh_config, remote_python, cache_cap, verbose)
        if recover and clear:
            raise UsageError("--recover and --clear do not go together")
        if session_id is not None and not clear:
            raise UsageError("--session goes with --clear")
        if root is not None and not recover:
            raise UsageError("--root goes with --recover")
        if recover:
            import trio

            from .client.oneshot import recover_kept

            root_dir = os.path.realpath(root or os.getcwd())
            done = trio.run(recover_kept, settings, root_dir)
        else:
            mode = ["--kept"] + (["--clear"] if clear else [])
            mode += ["--session", session_id] if session_id is not None else []
            out = _agent_json(settings, *mode)
    except BaseException as e:  # noqa: BLE001
        sys.exit(_report(e, verbose))
    if recover:
        sys.exit(_report_recovered(done))
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
        return
    if clear:
        click.echo(f"removed kept outputs on {settings.remote}: {human_size(out['freed'])} freed")
    _print_kept(out, settings.remote)


def _print_kept(out: dict, host: Remote) -> None:
    import time

    from .safetext import printable

    if not out["sessions"]:
        click.echo(f"nothing kept on {host}")
        return
    click.echo(f"kept on {host} at {out['path']}:")
    for s in out["sessions"]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created"]))
        whole = sum(1 for f in s["files"] if f.get("complete"))
        click.echo(
            f"{printable(s['session'])}  {when}  root {printable(s['root'] or '?')}  "
            f"{len(s['files'])} files ({whole} complete), {human_size(s['bytes'])}"
        )
        for f in s["files"]:
            state = "complete" if f.get("complete") else "partial "
            click.echo(f"  {state} {human_size(f['size']):>10}  {printable(f['path'])}")


def _report_recovered(done: Any) -> int:
    from .safetext import printable

    for path, final in zip(done.committed, done.saved_as, strict=True):
        name = printable(os.fsdecode(path))
        if final != path:
            _say(f"{name}: changed locally since; saved as {printable(os.fsdecode(final))}")
        else:
            _say(f"recovered {name}")
    for line in done.failed:
        _say(f"error: {printable(line)}")
    if done.partial_left:
        _say(f"{done.partial_left} partial output(s) left on the remote (see `kept --clear`)")
    if not done.committed and not done.failed:
        _say("nothing complete kept for this root")
    return EXIT_FAILURE if done.failed else 0


@main.command("doctor")
@remote_options
@backend_option
def doctor(
    remote: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    backend: str | None,
) -> None:
    """Check that the remote host can serve topyaz-mount, and say what is missing."""
    from .client.hostsetup import probe

    _setup_logging(verbose)
    try:
        settings = _settings(
            remote, ssh_options, ssh_config, remote_python, cache_cap, verbose, backend
        )
        facts = probe(settings)
    except BaseException as e:  # noqa: BLE001
        sys.exit(_report(e, verbose))
    host = str(settings.remote)
    click.echo(f"ssh to {host}: ok")
    where = f'{config_path()} [hosts."{host}"]'
    has_profile = load_profile(host) is not None
    click.echo(f"profile: {where}" if has_profile else f"profile: none ({where} is not set)")
    if facts.ready_for(None):
        click.echo(f"ok   setup: topyaz-mount {__version__} in {printable(facts.venv)}")
    else:
        others = printable(", ".join(facts.raw.get("others") or []) or "none")
        click.echo(
            f"--   setup: topyaz-mount {__version__} not set up (there: {others}); "
            f"`topyaz-mount setup --remote {host}` does it"
        )
    failed = 0
    try:
        out = _agent_json(settings, "--doctor")
    except TopyazMountError as e:
        click.echo(
            f"FAIL agent ({printable(settings.remote_python)}): {printable(str(collapse(e)))}"
        )
        sys.exit(EXIT_FAILURE)
    click.echo(f"ok   agent: {printable(settings.remote_python)}")
    try:
        for check in out["checks"]:
            mark = "ok  " if check["ok"] else "FAIL"
            failed += not check["ok"]
            click.echo(printable(f"{mark} {check['check']}: {check['detail']}"))
    except BaseException as e:  # noqa: BLE001 - an agent's answer of the wrong shape
        sys.exit(_report(e, verbose))
    sys.exit(EXIT_FAILURE if failed else 0)


@main.command("setup")
@remote_options
@backend_option
@click.option("--check", "check_only", is_flag=True, help="Only report; change nothing.")
def setup(
    remote: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    backend: str | None,
    check_only: bool,
) -> None:
    """Make the host ready: a venv with this version of topyaz-mount, and a profile.

    Afterwards exec, mount, cache, doctor and the Python API need no --remote-python.
    --remote-python here names the interpreter to make the venv from (default: the
    first Python >= 3.10 found there). Works offline too: what the host cannot
    download, this machine uploads. Where FUSE is not usable (or with --backend
    stage) the venv is made without pyfuse3 and the profile says backend = "stage".
    """
    from .client.hostsetup import SetupRequest, setup_host

    _setup_logging(verbose)

    def say(text: str) -> None:
        click.echo(f"topyaz-mount setup: {text}")

    try:
        settings = _settings(remote, ssh_options, ssh_config, None, cache_cap, verbose)
        profile = load_profile(str(settings.remote))
        asked = backend or (profile.backend if profile else None)
        result = setup_host(SetupRequest(settings, check_only, say, remote_python, asked))
        if result.ready and not check_only:
            updates = HostOptions(
                remote_python=result.venv_python,
                backend="stage" if result.backend == "stage" else backend,
                ssh_options=tuple(ssh_options) or None,
                ssh_config=os.path.abspath(ssh_config) if ssh_config else None,
                cache_cap=cache_cap,
            )
            if save_profile(str(settings.remote), updates):
                say(f'profile written: {config_path()} [hosts."{settings.remote}"]')
    except BaseException as e:  # noqa: BLE001
        sys.exit(_report(e, verbose))
    sys.exit(0 if result.ready else 1)


# --- long-lived sessions ------------------------------------------------------------


def _mount_child_argv(
    remote: str,
    ssh_options: Sequence[str],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    root: str,
    name: str,
    ready_fd: int,
    policy: PolicyOptions,
    backend: str | None = None,
    bwlimit: str | None = None,
) -> list[str]:
    argv = [sys.executable, "-m", "topyaz_mount", "mount", "--remote", remote]
    for opt in ssh_options:
        argv += ["-o", opt]
    if ssh_config:
        argv += ["--ssh-config", ssh_config]
    if remote_python:
        argv += ["--remote-python", remote_python]
    if cache_cap:
        argv += ["--cache-cap", cache_cap]
    if backend:
        argv += ["--backend", backend]
    if bwlimit:
        argv += ["--bwlimit", bwlimit]
    argv += ["-v"] * verbose + _policy_argv(policy)
    return argv + ["--root", root, "--name", name, "--ready-fd", str(ready_fd)]


def _detach(child_argv: list[str], ready_r: int, ready_w: int, log_path: str) -> dict:
    """Start the session in the background; its first words (or its failure)."""
    with open(log_path, "ab") as log_file:
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(
            child_argv,
            pass_fds=(ready_w,),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        data = ready.read()
    if data.strip():
        return json.loads(data)
    code = proc.wait()
    tail = ""
    try:
        with open(log_path, "rb") as f:
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
        tail = lines[-1].removeprefix("topyaz-mount: ") if lines else ""
    except OSError:
        pass
    return {"ok": False, "error": tail or f"the session exited with status {code}", "code": code}


def _print_ready(info: dict) -> None:
    name = info["name"]
    place = printable(f"{info['root']} mounted at {info['host']}:{info['mountpoint']}")
    click.echo(f"topyaz-mount: session {name}: {place}")
    click.echo(f"  run commands:  topyaz-mount exec --session {name} -- COMMAND")
    click.echo(f"  remote shell:  topyaz-mount shell --session {name}")
    click.echo(f"  unmount:       topyaz-mount unmount {name}")


@main.command("mount")
@remote_options
@backend_option
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Local directory to mount on the remote (default: the current directory).",
)
@click.option("--name", default=None, help="Session name (default: the root's name).")
@click.option("--detach", "-d", is_flag=True, help="Run in the background.")
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="No live transfer line (shown on stderr when it is a terminal).",
)
@bwlimit_option
@click.option("--ready-fd", type=int, default=None, hidden=True)
@grace_option
@policy_options
def mount(
    remote: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    backend: str | None,
    root: str | None,
    name: str | None,
    detach: bool,
    quiet: bool,
    bwlimit: str | None,
    ready_fd: int | None,
    grace: str | None,
    policy: PolicyOptions,
) -> None:
    """Mount the local root on the remote host and keep it mounted.

    Runs until Ctrl-C or `topyaz-mount unmount NAME` (with --detach, in the
    background). Commands then run through it without a new connection:

    \b
    topyaz-mount mount --remote gpu-box --detach
    topyaz-mount exec --session NAME -- tpai shots/a.jpg -o out/
    topyaz-mount shell --session NAME
    """
    _setup_logging(verbose)
    import trio

    from .client import control, persist, runtime

    try:
        rules = Policy.from_options(policy)
        root_dir = str(checked_root(root or os.getcwd(), policy.allow_home))
        session = runtime.check_name(name or runtime.default_name(Path(root_dir)))
        settings = _settings(
            remote,
            ssh_options,
            ssh_config,
            remote_python,
            cache_cap,
            verbose,
            backend=backend,
            grace=grace,
            bwlimit=bwlimit,
        )
        if detach:
            if grace is not None:  # the background session reads it from its environment
                os.environ["TOPYAZ_MOUNT_GRACE"] = grace
            if trio.run(control.alive, session):
                raise UsageError(
                    f"a session named {session} is running already (pick another with --name)"
                )
            r, w = os.pipe()
            child = _mount_child_argv(
                str(remote),
                ssh_options,
                ssh_config,
                remote_python,
                cache_cap,
                verbose,
                root_dir,
                session,
                w,
                policy,
                backend,
                bwlimit,
            )
            log_path = str(runtime.runtime_dir() / f"{session}.log")
            info = _detach(child, r, w, log_path)
            if not info.get("ok"):
                sys.exit(_fail(str(info.get("error")), int(info.get("code") or EXIT_FAILURE)))
            _print_ready(info)
            click.echo(f"  log:           {log_path}")
            return
        includes = _absolute(_profile(remote, HostOptions()).include or ())
    except BaseException as e:  # noqa: BLE001
        sys.exit(_not_ready(e, verbose, ready_fd))
    _serve_session(
        settings,
        root_dir,
        session,
        rules,
        includes,
        ready_fd=ready_fd,
        verbose=verbose,
        key=persist.reuse_key(settings, root_dir, policy),
        line=_progress_display(quiet, False) == "line" and ready_fd is None,
    )


def _not_ready(e: BaseException, verbose: int, ready_fd: int | None) -> int:
    """Report a session's failure to start; tell the process waiting on ``ready_fd``."""
    code = _report(e, verbose)
    if ready_fd is not None:
        try:
            message = str(collapse(e)) if not isinstance(e, KeyboardInterrupt) else "interrupted"
            os.write(ready_fd, json.dumps({"ok": False, "error": message, "code": code}).encode())
        except OSError:
            pass
    return code


def _serve_session(
    settings: SshSettings,
    root_dir: str,
    name: str,
    rules: Policy,
    includes: Sequence[str],
    *,
    ready_fd: int | None,
    verbose: int = 0,
    key: str | None = None,
    line: bool = False,
    idle: float | None = None,
    first_command: tuple[Sequence[str], str] | None = None,
) -> None:
    """Run session ``name`` until it ends (``mount``, or the session an exec leaves
    behind: ``idle``, ``first_command``); exits with how it ended."""
    # An exec's session connects first, and imports the rest while ssh connects.
    spawned = spawn_ssh(settings) if first_command is not None else None
    import trio

    from .client import mountd, progress

    def report_ready(info: dict) -> None:
        if ready_fd is not None:
            with contextlib.suppress(OSError):  # the exec that waited may have gone
                os.write(ready_fd, json.dumps({"ok": True, **info}).encode() + b"\n")
            os.close(ready_fd)
        else:
            _print_ready(info)
        sys.stdout.flush()

    def report_listening() -> None:
        """An exec's own session: that exec sends its command now (persist.start)."""
        if ready_fd is not None and first_command is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b'{"listening": true}\n')

    shown = progress.TerminalLine() if line else None

    try:
        server, lost = trio.run(
            lambda: mountd.serve(
                settings,
                root_dir,
                name,
                on_ready=report_ready,
                on_listening=report_listening,
                say=_say,
                policy=rules,
                includes=includes,
                line=shown,
                key=key,
                idle=idle,
                spawned=spawned,
                first_command=first_command,
            )
        )
    except BaseException as e:  # noqa: BLE001
        sys.exit(_not_ready(e, verbose, ready_fd))
    if lost:
        message = server.session.loss_message("")
        sys.exit(_fail(f"{message}; session {name} ended", EXIT_FAILURE))
    closed = server.closed
    if closed is not None and closed.kept_files:
        _say(
            f"dropped {closed.kept_files} output(s), {human_size(closed.kept_bytes)}, not "
            f"committed; kept on {settings.remote} at {closed.kept_dir}"
        )
    _say(f"session {name} unmounted")


@main.command("unmount")
@click.argument("name")
@click.option(
    "--force",
    is_flag=True,
    help="Kill running commands and drop outputs not yet committed (kept on the remote).",
)
@click.option("--verbose", "-v", count=True)
def unmount(name: str, force: bool, verbose: int) -> None:
    """Unmount session NAME, after its running commands end and outputs are committed."""
    _setup_logging(verbose)
    import trio

    from .client import runtime, session_client

    try:
        done = trio.run(session_client.unmount, runtime.check_name(name), force, _say)
    except BaseException as e:  # noqa: BLE001
        sys.exit(_report(e, verbose))
    if done.kept_files:
        _say(
            f"dropped {done.kept_files} output(s), {human_size(done.kept_bytes)}, not committed; "
            f"kept on the remote host at {done.kept_dir}"
        )
    _say(f"session {name} unmounted")


@main.command("status")
@remote_options
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of sessions).")
def status(
    remote: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    name: str | None,
    as_json: bool,
) -> None:
    """List the running sessions (or show one). With --remote HOST: the detachable
    sessions (--grace) running on HOST, and since when each waits for its client."""
    import trio

    from .client import runtime, session_client

    source = click.get_current_context().get_parameter_source("remote")
    if source is click.core.ParameterSource.COMMANDLINE:  # not from TOPYAZ_MOUNT_REMOTE
        _setup_logging(verbose)
        try:
            settings = _settings(remote, ssh_options, ssh_config, remote_python, cache_cap, verbose)
            _print_detachable(_agent_json(settings, "--detachable")["sessions"], as_json)
        except BaseException as e:  # noqa: BLE001
            sys.exit(_report(e, verbose))
        return
    try:
        if name is not None:
            sessions = [trio.run(session_client.query, runtime.check_name(name))]
        else:
            sessions = trio.run(session_client.all_sessions)
    except BaseException as e:  # noqa: BLE001
        sys.exit(_report(e, 0))
    if as_json:
        click.echo(json.dumps(sessions, sort_keys=True))
        return
    if not sessions:
        click.echo("no sessions")
        return
    from .client.progress import describe, from_flat

    for s in sessions:
        moved = s.get("content_bytes_sent", 0) + s.get("content_bytes_received", 0)
        place = printable(f"{s['name']}: {s['root']} on {s['host']}:{s['mountpoint']}")
        if s.get("backend"):
            place += f" ({s['backend']})"
        if s.get("persist_seconds") is not None:
            place += f"; left by exec, ends after {_duration(s['persist_seconds'])} idle"
        click.echo(
            f"{place}\n"
            f"  up {_duration(s['uptime_seconds'])}, {s['running']} running, "
            f"{s.get('pending_outputs', 0)} outputs pending "
            f"({human_size(s.get('pending_bytes', 0))}), moved {human_size(moved)} "
            f"({human_size(s.get('content_bytes_sent', 0))} up, "
            f"{human_size(s.get('content_bytes_received', 0))} down), "
            f"cache {s.get('cache_hits', 0)} hits / {s.get('cache_misses', 0)} misses"
        )
        figures = from_flat(s)
        if figures is not None:  # the figures a foreground `mount` shows live
            click.echo(f"  {printable(describe(figures))}")


@main.command("attach")
@remote_options
@stats_option
@click.argument("session")
def attach(
    remote: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    stats_format: str | None,
    session: str,
) -> None:
    """Take over the detached SESSION (its client died, or runs elsewhere): print the
    rest of its command's output, commit its outputs, exit with its status.

    \b
    topyaz-mount status --remote gpu-box      # lists the detached sessions
    topyaz-mount attach --remote gpu-box 3f2a9c0d1e4b5a6f
    """
    _setup_logging(verbose)
    from .client import detached
    from .client.reconnect import AttachRefused

    try:
        record = detached.load(session)
        if detached.client_alive(record):
            raise UsageError(f"session {session} is attached to a live client (pid {record.pid})")
        settings = _settings(
            remote or record.remote, ssh_options, ssh_config, remote_python, cache_cap, verbose
        )
        settings = replace(settings, grace=settings.grace or DEFAULT_GRACE)
        import trio

        from .client.attach import attach_async

        try:
            result = trio.run(attach_async, settings, record)
        except BaseException as e:
            refused = collapse(e)
            if isinstance(refused, AttachRefused):
                raise _refused(session, settings, refused) from None
            raise
    except BaseException as e:  # noqa: BLE001 - errors become one line and a status
        sys.exit(_report(e, verbose))
    _finish(result, stats_format)


def _refused(session: str, settings: SshSettings, e: Exception) -> Exception:
    """The host's refusal of an attach, as the one line the user reads."""
    from .client import detached

    text = str(e)
    if "no such session" in text or "has ended" in text:
        detached.path_of(session).unlink(missing_ok=True)  # nothing left to attach to
        return AgentUnavailable(f"session {session} has ended on {settings.remote}")
    if "live client" in text:
        return AgentUnavailable(f"session {session} is attached to a live client")
    return AgentUnavailable(f"session {session}: {text}")


def _print_detachable(sessions: list, as_json: bool) -> None:
    """The remote's detachable sessions; what the (untrusted) host says is made printable."""
    if as_json:
        click.echo(json.dumps(sessions, sort_keys=True))
        return
    if not sessions:
        click.echo("no detachable sessions")
        return
    for s in sessions:
        since, grace = s.get("detached_since"), s.get("grace_seconds")
        if not isinstance(since, (int, float)):
            state = "attached"
        elif isinstance(grace, (int, float)):
            away = time.time() - since
            left = _duration(max(0, grace - away))
            state = f"detached for {_duration(away)}, {left} of grace left"
        else:
            state = "detached"
        started = s.get("since")
        if isinstance(started, (int, float)):
            state = f"up since {time.strftime('%H:%M:%S', time.localtime(started))}, {state}"
        commands = s.get("command")
        what = "; ".join(map(str, commands)) if isinstance(commands, list) and commands else "-"
        line = f"{s.get('session')}: {what} (in {s.get('root')}), {state}"
        click.echo(printable(line))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@main.command(
    "shell",
    cls=PassThroughCommand,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--session", "session_name", required=True, metavar="NAME", help="The session.")
@click.option("--verbose", "-v", count=True)
@progress_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def shell(
    session_name: str,
    verbose: int,
    stats_format: str | None,
    quiet: bool,
    json_progress: bool,
    command: tuple[str, ...],
) -> None:
    """Open a remote shell (a real terminal) in the translated current directory.

    With COMMAND, run it on a terminal instead, as `ssh -t` does.
    """
    _setup_logging(verbose)
    from .client import control, runtime, session_exec

    try:
        display = _progress_display(quiet, json_progress)
        rows, cols = session_exec.terminal_size()
        env = {"TERM": os.environ.get("TERM", "xterm-256color")}
        req = control.Exec(list(command), os.getcwd(), env, True, [], [rows, cols])
        with session_exec.raw_terminal(0):
            done = session_exec.run(
                runtime.check_name(session_name), req, _say, interactive=True, display=display
            )
    except BaseException as e:  # noqa: BLE001
        sys.exit(_report(e, verbose))
    _finish_session(done, stats_format)


@main.command(
    "topyaz",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@remote_options
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Local directory to mount on the remote (default: the current directory); "
    "topyaz's inputs and outputs must be under it.",
)
@policy_options
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def topyaz_(
    remote: str | None,
    ssh_options: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str | None,
    cache_cap: str | None,
    verbose: int,
    root: str | None,
    args: tuple[str, ...],
    policy: PolicyOptions,
) -> None:
    """Run topyaz's own command line here and only the Topaz CLI on the remote host.

    ARGS are topyaz's, unchanged; so is the exit status.

    \b
    topyaz-mount topyaz --remote gpu-box photo shots/a.jpg
    topyaz-mount topyaz --remote gpu-box giga shots/ --scale 4
    """
    _setup_logging(verbose)
    try:
        if not remote:
            raise UsageError("missing --remote HOST (or set TOPYAZ_MOUNT_REMOTE)")
        if cache_cap is not None:
            raise UsageError("--cache-cap: with `topyaz`, set it in the host's profile (setup)")
        root_dir = str(checked_root(root or os.getcwd(), policy.allow_home))
        try:
            from .topyaz import run_cli
        except ImportError as e:
            raise UsageError(str(e)) from None
        from .executor import RemoteOptions

        where = Remote.parse(remote)
        options = RemoteOptions(
            where.host,
            where.user,
            ssh_port=where.port or 22,
            ssh_options=ssh_options,
            ssh_config=ssh_config,
            remote_python=remote_python,
        )
        code = run_cli(options, root_dir, args, policy)
    except BaseException as e:  # noqa: BLE001
        sys.exit(_report(e, verbose))
    sys.exit(code)


if __name__ == "__main__":
    main()
