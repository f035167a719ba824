"""The real topyaz on the client, only the Topaz CLI on the host.

``from topyaz_mount.topyaz import MountExecutor`` gives an executor that *is* a topyaz
``CommandExecutor``: ``PhotoAI(MountExecutor(RemoteOptions(host=...),
ExecutorContext(working_dir=root)), ProcessingOptions()).process("root/a.jpg")`` runs
topyaz's option-to-flag logic here and the Topaz CLI on the host, through the mount.
``topyaz-mount topyaz --remote HOST photo a.jpg`` (``run_cli``) does the same for
topyaz's own command line. Three things topyaz assumes of a local run are made true
remotely:

- **The product's CLI is looked up where it runs.** While this module is imported,
  a product whose executor is ours asks the host (once per session): the host
  profile's product command, else the remote PATH, else Topaz's install locations for
  the host's OS.
- **topyaz's temporary output directory is under the root.** topyaz writes into
  ``tempfile.TemporaryDirectory(prefix="topyaz_...")`` and moves the result into
  place; for the call, that directory's stand-in is a fresh directory inside the root,
  and what the command wrote there is moved into topyaz's directory afterwards.
- **topyaz's semantics**: ``timeout=0`` or None means the context's timeout; the
  environment is the context's ``get_env()`` delta plus the ``TVAI_*`` variables
  products set in ``os.environ``; failures are topyaz's ``ProcessingError`` family.

topyaz is an optional extra (``topyaz-mount[topyaz]``); ``import topyaz_mount`` does
not import it, this module does.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from topyaz.core.errors import ProcessingError, RemoteExecutionError
    from topyaz.core.types import Product
    from topyaz.execution.base import CommandExecutor, ExecutorContext
    from topyaz.products.base import TopazProduct
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        f"topyaz_mount.topyaz needs topyaz ({e}); install it with its source: "
        "pip install 'topyaz-mount[topyaz]'"
    ) from e

from . import executor
from .client.config import load_profile
from .client.translate import TranslationError
from .client.transport import Remote
from .errors import ConnectionFailed, JobTimeout, RemoteCommandFailed, TopyazMountError
from .policy import PolicyOptions

__all__ = ["MountExecutor", "run_cli"]

# The host profile's key for each product (``photo_cmd`` ...).
PROFILE_KEYS = {Product.PHOTO_AI: "photo", Product.GIGAPIXEL: "giga", Product.VIDEO_AI: "video"}
# topyaz names its temporary directories "topyaz_<product>_..." (TopazProduct.process).
TEMP_PREFIX = "topyaz_"
MIRROR_PREFIX = ".topyaz-mount-tmp-"


@dataclass(frozen=True)
class Install:
    """Where a product's CLI may be on a host."""

    names: tuple[str, ...]  # looked up on the remote PATH
    places: dict[str, tuple[str, ...]]  # Topaz's install locations by `uname -s`; ~ = home
    tvai: bool = False  # must be Topaz's ffmpeg (it has the tvai_up filter), not any ffmpeg


INSTALLS = {
    "photo": Install(
        ("tpai",),
        {
            "Darwin": (
                "/Applications/Topaz Photo AI.app/Contents/Resources/bin/tpai",
                "~/Applications/Topaz Photo AI.app/Contents/Resources/bin/tpai",
            ),
            "Linux": ("/usr/local/bin/tpai", "/opt/photo-ai/bin/tpai"),
        },
    ),
    "giga": Install(
        ("gigapixel",),
        {
            "Darwin": (
                "/Applications/Topaz Gigapixel AI.app/Contents/Resources/bin/gigapixel",
                "~/Applications/Topaz Gigapixel AI.app/Contents/Resources/bin/gigapixel",
            ),
            "Linux": ("/usr/local/bin/gigapixel", "/opt/gigapixel/bin/gigapixel"),
        },
    ),
    "video": Install(
        ("ffmpeg", "tvai-ffmpeg"),
        {
            "Darwin": (
                "/Applications/Topaz Video AI.app/Contents/MacOS/ffmpeg",
                "~/Applications/Topaz Video AI.app/Contents/MacOS/ffmpeg",
            ),
            "Linux": ("/usr/local/bin/tvai-ffmpeg", "/opt/video-ai/bin/ffmpeg"),
        },
        tvai=True,
    ),
}

# What VideoAI._setup_environment puts in os.environ, by OS (~ = home): guesses for
# the machine topyaz runs on, so each is replaced by the host's own value or guess.
TVAI_GUESSES = {
    "Darwin": {
        "TVAI_MODEL_DIR": "/Applications/Topaz Video AI.app/Contents/Resources/models",
        "TVAI_MODEL_DATA_DIR": "~/Library/Application Support/Topaz Labs LLC/Topaz Video AI/models",
    },
    "Linux": {
        "TVAI_MODEL_DIR": "/opt/video-ai/models",
        "TVAI_MODEL_DATA_DIR": "~/._config/topaz-video-ai/models",
    },
}

_PICK = r"""pick() {
  kind=$1; shift
  for c in "$@"; do
    case $c in
      /*) p=$c; [ -f "$p" ] && [ -x "$p" ] || continue ;;
      *) p=$(command -v -- "$c" 2>/dev/null) || continue
         case $p in /*) ;; *) continue ;; esac ;;
    esac
    if [ "$kind" = tvai ]; then
      "$p" -hide_banner -filters </dev/null 2>/dev/null | grep -q tvai_up || continue
    fi
    printf '%s\n' "$p"; return 0
  done
  return 1
}
os=$(uname -s)
printf 'os=%s\nhome=%s\n' "$os" "$HOME"
env | grep '^TVAI_[A-Z_]*=' | sed 's/^/env./'
"""


def _home_word(place: str) -> str:
    """A shell word for ``place``, with a leading ``~/`` as the remote's $HOME."""
    if place.startswith("~/"):
        return '"$HOME"/' + shlex.quote(place[2:])
    return shlex.quote(place)


def _probe_script(profile_cmds: dict[str, str]) -> str:
    lines = [_PICK]
    for key, where in INSTALLS.items():
        kind = "tvai" if where.tvai else "any"
        first = [profile_cmds[key]] if key in profile_cmds else []
        names = " ".join(shlex.quote(n) for n in (*first, *where.names))
        by_os = " ".join(
            f"{os_name}) pick {kind} {' '.join(_home_word(p) for p in places)} ;;"
            for os_name, places in where.places.items()
        )
        lines.append(
            f'printf "{key}=%s\\n" "$(pick {kind} {names} || case $os in {by_os} esac)"'
        )
    return "\n".join(lines) + "\n"


@dataclass
class HostFacts:
    """What one probe learnt about the host: its OS, home, TVAI_* and product CLIs."""

    os: str = ""
    home: str = ""
    env: dict[str, str] = field(default_factory=dict)
    programs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> HostFacts:
        facts = cls()
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if not sep:
                continue
            if key.startswith("env."):
                facts.env[key[4:]] = value
            elif key in ("os", "home"):
                setattr(facts, key, value)
            elif key in INSTALLS and value.startswith("/"):
                facts.programs[key] = value
        return facts

    def guesses(self) -> dict[str, str]:
        return _expand(TVAI_GUESSES.get(self.os, {}), self.home)


def _expand(values: dict[str, str], home: str) -> dict[str, str]:
    return {k: home + v[1:] if v.startswith("~/") else v for k, v in values.items()}


class MountExecutor(executor.MountExecutor, CommandExecutor):
    """A topyaz ``CommandExecutor`` that runs each command on the host through the mount.

    Takes topyaz's own ``RemoteOptions`` (or topyaz-mount's, which adds ssh options, an
    ssh config and the remote Python) and topyaz's ``ExecutorContext``.
    """

    context: ExecutorContext  # type: ignore[assignment]  # topyaz's, not topyaz-mount's

    def __init__(
        self,
        options: Any,
        context: ExecutorContext | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        policy: PolicyOptions | None = None,
    ) -> None:
        if not options.host:
            raise ValueError("RemoteOptions.host is required")
        super().__init__(options, context or ExecutorContext(), root=root, policy=policy)
        self._facts: HostFacts | None = None
        self._facts_of: object = None  # the session the facts were learnt in

    # ---------------------------------------------------------------- the host's facts

    def _profile_cmds(self) -> dict[str, str]:
        """The host profile's product commands that name a Topaz CLI (not topyaz)."""
        o = self.options
        port = o.ssh_port if o.ssh_port and o.ssh_port != 22 else None
        profile = load_profile(str(Remote(o.host, o.user, port)))
        found = {}
        for key in INSTALLS:
            words = shlex.split(getattr(profile, f"{key}_cmd", None) or "")
            if words and os.path.basename(words[0]) != "topyaz":
                found[key] = words[0]
        return found

    def host_facts(self) -> HostFacts:
        """The host's facts, probed once per session (one remote ``sh``)."""
        mount = self._session()
        if self._facts is None or self._facts_of is not mount:
            script = _probe_script(self._profile_cmds())
            code, out, err = self.run(["sh", "-c", script], {}, None, 120.0, (script,))
            if code != 0:
                raise RemoteExecutionError(f"cannot look for the Topaz CLIs on the host: {err}")
            self._facts, self._facts_of = HostFacts.parse(out), mount
        return self._facts

    def find_product(self, product: TopazProduct) -> Path | None:
        """Where ``product``'s CLI is on the host, or None (topyaz then raises
        ExecutableNotFoundError). A dry run does not connect: the bare name stands in."""
        if self.context.dry_run:
            return Path(product.executable_name)
        try:
            program = self.host_facts().programs.get(PROFILE_KEYS[product.product_type])
        except TopyazMountError as e:
            raise RemoteExecutionError(f"{self.options.host}: {e}") from e
        return Path(program) if program else None

    # ---------------------------------------------------------------- running

    def _environment(self) -> dict[str, str]:
        """The context's delta over os.environ, and the TVAI_* variables."""
        env = {k: v for k, v in self.context.get_env().items() if os.environ.get(k) != v}
        tvai = {k: v for k, v in os.environ.items() if k.startswith("TVAI_")}
        if tvai:
            facts = self.host_facts()
            here = _expand(TVAI_GUESSES.get(platform.system(), {}), str(Path.home()))
            theirs = {**facts.guesses(), **facts.env}
            for k, v in tvai.items():
                if here.get(k) == v:  # topyaz's guess for this machine: use the host's
                    v = theirs.get(k, v)
                env.setdefault(k, v)
        return env

    @contextmanager
    def _temp_dirs_in_root(self, command: Sequence[str]) -> Iterator[list[str]]:
        """``command`` with topyaz's temporary directories swapped for fresh ones
        inside the root; afterwards what was written there moves into topyaz's."""
        tmp = os.path.realpath(tempfile.gettempdir())
        mirrors: dict[str, str] = {}
        argv = []
        try:
            for arg in command:
                top = _topyaz_temp_dir(arg, tmp)
                if top is not None and _under(top, self.root) is None:
                    if top not in mirrors:
                        mirrors[top] = tempfile.mkdtemp(prefix=MIRROR_PREFIX, dir=self.root)
                    arg = mirrors[top] + arg[len(top) :]
                argv.append(arg)
            if mirrors:  # new here: the host's listing of the root may predate them
                self._session().changed(list(mirrors.values()))
            yield argv
        finally:
            for top, mirror in mirrors.items():
                for name in os.listdir(mirror):
                    shutil.move(os.path.join(mirror, name), os.path.join(top, name))
                shutil.rmtree(mirror, ignore_errors=True)

    def execute(
        self,
        command: list[str],
        input_data: str | None = None,
        timeout: int | None = None,
    ) -> tuple[int, str, str]:
        """Run ``command`` on the host, as topyaz's LocalExecutor runs it here."""
        limit = timeout or self.context.timeout
        if self.context.dry_run:
            return 0, "dry-run-output", ""
        try:
            programs = set(self.host_facts().programs.values())
            literal = tuple(a for a in command[:1] if a in programs)
            with self._temp_dirs_in_root(command) as argv:
                code, out, err = self.run(
                    argv,
                    self._environment(),
                    input_data,
                    None if limit is None else float(limit),
                    literal,
                )
        except JobTimeout as e:
            raise ProcessingError(f"Command timed out after {limit} seconds") from e
        except RemoteCommandFailed as e:
            if e.exit_code == 127:
                raise ProcessingError(f"Command not found: {command[0]}") from e
            raise ProcessingError(f"Command execution failed: {e}") from e
        except ConnectionFailed as e:
            raise RemoteExecutionError(f"{self.options.host}: {e}") from e
        except (TopyazMountError, TranslationError, OSError) as e:
            raise ProcessingError(f"Command execution failed: {e}") from e
        if code == 127 and _not_found(err):
            raise ProcessingError(f"Command not found: {command[0]}")
        return code, out, err

    def get_info(self) -> dict[str, Any]:
        """topyaz's keys first (type, available), then topyaz-mount's."""
        info: dict[str, Any] = CommandExecutor.get_info(self)
        for key, value in super().get_info().items():
            info.setdefault(key, value)
        info.update(
            working_dir=self.context.working_dir or self.root,
            timeout=str(self.context.timeout),
            dry_run=str(self.context.dry_run),
        )
        return info


def _not_found(stderr: str) -> bool:
    """Did the agent's ``env -C DIR -- COMMAND`` fail to find COMMAND?"""
    lines = stderr.rstrip("\n").splitlines()
    return bool(lines) and lines[-1].startswith("env: ") and "No such file" in lines[-1]


def _under(path: str, root: os.PathLike[str] | str) -> str | None:
    root = os.fspath(root).rstrip("/")
    if path == root or path.startswith(root + "/"):
        return path[len(root) :]
    return None


def _topyaz_temp_dir(arg: str, tmp: str) -> str | None:
    """The topyaz temporary directory ``arg`` is or lies in, if it exists."""
    rest = _under(arg, tmp) if os.path.isabs(arg) else None
    if not rest:
        return None
    name = rest.lstrip("/").split("/", 1)[0]
    top = os.path.join(tmp, name)
    return top if name.startswith(TEMP_PREFIX) and os.path.isdir(top) else None


_local_find_executable = TopazProduct.find_executable


def _find_executable(self: TopazProduct) -> Path | None:
    """A product whose executor is ours looks for its CLI on the host."""
    if isinstance(self.executor, MountExecutor):
        if self._executable_path is None:
            self._executable_path = self.executor.find_product(self)
        return self._executable_path
    return _local_find_executable(self)


TopazProduct.find_executable = _find_executable  # type: ignore[method-assign]


def run_cli(
    options: Any, root: str, args: Sequence[str], policy: PolicyOptions | None = None
) -> int:
    """topyaz's own command line (``topyaz photo a.jpg ...``) with its executor ours.

    topyaz's ``main`` runs unchanged; its TopyazCLI builds a LocalExecutor from its
    context, and for this call that name builds our executor from the same context.
    Returns the exit status topyaz's command line would have.
    """
    import topyaz.cli as topyaz_cli

    made: list[MountExecutor] = []

    def executor_for(context: ExecutorContext | None = None) -> MountExecutor:
        made.append(MountExecutor(options, context, root=root, policy=policy))
        return made[-1]

    local_executor, saved_argv = topyaz_cli.LocalExecutor, sys.argv
    topyaz_cli.LocalExecutor = executor_for  # type: ignore[assignment,misc]
    sys.argv = ["topyaz", *args]
    try:
        topyaz_cli.main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        topyaz_cli.LocalExecutor = local_executor  # type: ignore[misc]
        sys.argv = saved_argv
        for ex in made:
            ex.close()
