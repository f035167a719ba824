"""The one prefix swap: a local root becomes the remote mountpoint.

Pure functions over strings. Absolute paths under the root (existing or not) swap
their prefix; the working directory swaps too, so relative paths that stay inside the
root are already right on the remote and are left exactly as typed (a bare ``2`` or
``png`` is never mistaken for a file). A path that names something outside the root is
an error, because the remote cannot see it. Absolute paths that exist nowhere on the
client (``/opt/topaz/models``) are taken as remote paths and left alone. Local paths are
first spelled as their directories store them (spelling.py): on a case-insensitive Mac
volume ``Shots/A.JPG`` reaches the job as ``shots/a.jpg``, the name its listing shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .spelling import Spelling

DEFAULT_PRODUCTS: dict[str, list[str]] = {
    "photo": ["topyaz", "photo"],
    "giga": ["topyaz", "giga"],
    "video": ["topyaz", "video"],
}
# Local paths that mean the same thing on any Unix host.
_PASSTHROUGH_PREFIXES = ("/dev/",)


class TranslationError(ValueError):
    """An argument or directory cannot be reached through the mount."""


@dataclass(frozen=True)
class PathMap:
    local_root: str
    remote_root: str

    def __post_init__(self) -> None:
        for root in (self.local_root, self.remote_root):
            if not os.path.isabs(root):
                raise ValueError(f"root must be absolute: {root!r}")

    @staticmethod
    def _under(path: str, root: str) -> str | None:
        """The part of ``path`` below ``root`` ("" for the root itself), or None."""
        root = root.rstrip("/") or "/"
        if path == root:
            return ""
        prefix = root if root.endswith("/") else root + "/"
        if path.startswith(prefix):
            return path[len(prefix) :]
        return None

    def to_remote(self, local_abs: str) -> str | None:
        rest = self._under(os.path.normpath(local_abs), self.local_root)
        if rest is None:
            real = os.path.realpath(local_abs)
            rest = self._under(real, self.local_root)
        if rest is None:
            return None
        return _join(self.remote_root, rest)

    def to_local(self, remote_abs: str) -> str | None:
        rest = self._under(os.path.normpath(remote_abs), self.remote_root)
        return None if rest is None else _join(self.local_root, rest)

    def relative(self, local_abs: str) -> str | None:
        """Root-relative form ("" for the root), or None outside it."""
        rest = self._under(os.path.normpath(local_abs), self.local_root)
        if rest is None:
            rest = self._under(os.path.realpath(local_abs), self.local_root)
        return rest


def _join(root: str, rest: str) -> str:
    return root if not rest else root.rstrip("/") + "/" + rest


def _outside(path: str, root: str) -> TranslationError:
    return TranslationError(
        f"{path}: outside the root {root}; the remote job can only see files under the "
        f"root (pass --root to a directory that contains it)"
    )


def translate_value(
    value: str,
    pm: PathMap,
    cwd: str,
    *,
    lexists: Callable[[str], bool] = os.path.lexists,
    spell: Callable[[str], str] | None = None,
) -> str:
    """One argument (or environment value) as the remote must see it."""
    if not value:
        return value
    spell = spell or Spelling()
    if os.path.isabs(value):
        remote = pm.to_remote(spell(value))
        if remote is not None:
            if value.endswith("/") and not remote.endswith("/"):
                remote += "/"
            return remote
        if value.startswith(_PASSTHROUGH_PREFIXES):
            return value
        parent = os.path.dirname(os.path.normpath(value))
        if lexists(value) or (parent != "/" and lexists(parent)):
            raise _outside(value, pm.local_root)
        return value
    typed = os.path.normpath(os.path.join(cwd, value))
    full = spell(typed)
    if pm.relative(full) is not None:
        if full == typed:
            return value
        stored = os.path.relpath(full, spell(cwd))  # typed in another case or form
        return stored + "/" if value.endswith("/") else stored
    if lexists(full) or ("/" in value and lexists(os.path.dirname(full))):
        raise _outside(value, pm.local_root)
    return value


def translate_arg(
    arg: str,
    pm: PathMap,
    cwd: str,
    *,
    lexists: Callable[[str], bool] = os.path.lexists,
    spell: Callable[[str], str] | None = None,
) -> str:
    """An argv element: a path, a ``--flag=PATH``, or anything else (left alone)."""
    if arg.startswith("--") and "=" in arg:
        flag, _, value = arg.partition("=")
        return f"{flag}={translate_value(value, pm, cwd, lexists=lexists, spell=spell)}"
    if arg.startswith("-") and not os.path.isabs(arg) and "/" not in arg:
        return arg  # an option like -o or --scale
    return translate_value(arg, pm, cwd, lexists=lexists, spell=spell)


def translate_cwd(cwd: str, pm: PathMap, *, spell: Callable[[str], str] | None = None) -> str:
    remote = pm.to_remote((spell or Spelling())(cwd))
    if remote is None:
        raise TranslationError(
            f"the current directory {cwd} is outside the root {pm.local_root}; "
            f"run from inside it or pass --root"
        )
    return remote


def translate_argv(
    argv: Iterable[str],
    pm: PathMap,
    cwd: str,
    *,
    literal: Iterable[str] = (),
    lexists: Callable[[str], bool] = os.path.lexists,
    spell: Callable[[str], str] | None = None,
) -> list[str]:
    """Every argument translated; those listed in ``literal`` pass through untouched."""
    keep = set(literal)
    spell = spell or Spelling()
    return [
        a if a in keep else translate_arg(a, pm, cwd, lexists=lexists, spell=spell) for a in argv
    ]


def translate_env(
    env: Mapping[str, str],
    pm: PathMap,
    cwd: str,
    *,
    lexists=os.path.lexists,
    spell: Callable[[str], str] | None = None,
) -> dict[str, str]:
    spell = spell or Spelling()
    return {k: translate_value(v, pm, cwd, lexists=lexists, spell=spell) for k, v in env.items()}


def expand_product(argv: list[str], products: Mapping[str, list[str]]) -> list[str]:
    """``photo x.jpg`` becomes ``topyaz photo x.jpg`` (or the configured program)."""
    if argv and argv[0] in products:
        return [*products[argv[0]], *argv[1:]]
    return list(argv)
