"""What the remote may write and see under the root: rules in, decisions out.

The GPU host is not trusted. Whatever its agent asks, the client refuses writes that
would make a later local action run code or leak a secret (a git hook, a shell start-up
file, an ssh key), hides secrets outright, never sets setuid/setgid/sticky bits, and
refuses roots that expose the system or the whole home directory. This module only
decides; ``fileserver.py`` asks it before every request it serves, and the agent asks
the same rules so an honest job gets its EACCES at ``open`` rather than at commit.

Names are compared the way a macOS volume compares them: case-insensitively, after
Unicode normalization, and ignoring the invisible code points HFS+ ignores (the trick
of git's CVE-2014-9390: ``.g\\u200cit`` is ``.git`` there). A rule is a ``/``-separated
glob of names that matches at any depth of the root (``.git``, ``Library/LaunchAgents``,
``*.pem``), or only at the root when it starts with ``/``; it covers the path it names
and everything beneath it.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import UsageError
from .safetext import printable

# Never written by the remote, at any depth: each makes a later local action run code.
DEFAULT_PROTECT: tuple[str, ...] = (
    # git runs hooks, and config can name programs (core.fsmonitor, core.pager,
    # filters, aliases); refs and objects decide what is checked out and pushed, and a
    # `.git` *file* can point git at a planted directory. Jobs never write there.
    ".git",
    ".hg",  # hgrc [hooks]
    ".gitconfig",
    ".config/git",
    # keys and agents
    ".ssh",
    ".gnupg",
    # shell start-up and logout files
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".bash_logout",
    ".profile",
    ".zshrc",
    ".zprofile",
    ".zshenv",
    ".zlogin",
    ".zlogout",
    ".cshrc",
    ".tcshrc",
    ".login",
    ".logout",
    ".kshrc",
    ".inputrc",
    ".config/fish",
    ".pam_environment",
    ".config/environment.d",
    # X session start-up
    ".xprofile",
    ".xinitrc",
    ".xsession",
    ".xsessionrc",
    # autostart (macOS launchd, XDG, systemd user units)
    "Library/LaunchAgents",
    "Library/LaunchDaemons",
    "Library/StartupItems",
    ".config/autostart",
    ".config/systemd/user",
    # programs found first on PATH, and desktop launchers
    ".local/bin",
    ".local/share/applications",
    # run by a tool when you enter or open the directory
    ".envrc",  # direnv
    ".exrc",  # vi/vim with 'exrc'
    ".vimrc",
    ".nvimrc",
    ".config/nvim",
    ".emacs",
    ".emacs.d",
    ".vscode",  # tasks.json can run on folder open
)

# Neither listed, read nor written: credentials and private keys.
DEFAULT_HIDE: tuple[str, ...] = (
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".kube",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".password-store",
    ".docker/config.json",
    ".config/gcloud",
    ".config/gh",
    "*.pem",
    "*.key",
    "Library/Keychains",
    # AppleDouble files (the Finder's metadata of ``x`` on non-Mac volumes, named
    # ``._x``): not content, and a batch tool given the folder would take ``._a.jpg``
    # for an image. Never listed, announced as inputs, or written as outputs.
    "._*",
)

PERMISSION_BITS = 0o777  # setuid, setgid and sticky are never set on the client

# Directories a root may not be, lie in, or contain. Both spellings of macOS's
# /private links are listed, because the root is compared after resolving symlinks.
SYSTEM_DIRS: tuple[str, ...] = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var",
    "/System",
    "/Library",
    "/Applications",
    "/private/etc",
    "/private/var",
    "/cores",
)
# Scratch space inside system directories, where a root is fine.
SCRATCH_DIRS: tuple[str, ...] = (
    "/var/tmp",
    "/var/folders",
    "/private/var/tmp",
    "/private/var/folders",
)

MAX_REFUSALS_KEPT = 1000  # a hostile agent must not grow the list without bound


class PolicyError(UsageError):
    """A rule or an option that cannot be used (bad pattern, unknown rule)."""


@dataclass(frozen=True)
class PolicyOptions:
    """What the user chose: the one object passed from the command line or the API
    down to the file server (and, as its rules, to the agent)."""

    protect: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()
    allow_write: tuple[str, ...] = ()
    read_only: bool = False
    allow_home: bool = False


def fold(name: str | bytes) -> str:
    """A name as a case-insensitive, normalizing volume compares it."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    if name.isascii():  # the common case, and cheap: no format characters, NFC already
        return name.lower()
    # HFS+ ignores zero-width and bidi format characters in names; so do we.
    name = "".join(ch for ch in name if unicodedata.category(ch) != "Cf")
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _split_pattern(pattern: str) -> tuple[bool, tuple[str, ...]]:
    text = pattern.strip()
    anchored = text.startswith("/")
    parts = tuple(text.strip("/").split("/"))
    if not text.strip("/") or "\x00" in text or any(p in ("", ".", "..") for p in parts):
        raise PolicyError(
            f"pattern {pattern!r}: expected names separated by '/' (like .git or *.pem)"
        )
    return anchored, tuple(fold(p) for p in parts)


@dataclass(frozen=True)
class _Rule:
    text: str
    anchored: bool
    parts: tuple[str, ...]
    regexes: tuple[re.Pattern[str], ...]
    literal: bool  # no wildcards: compared name by name

    @classmethod
    def parse(cls, pattern: str) -> _Rule:
        anchored, parts = _split_pattern(pattern)
        regexes = tuple(re.compile(fnmatch.translate(p)) for p in parts)
        literal = not any(ch in p for p in parts for ch in "*?[")
        return cls(pattern.strip(), anchored, parts, regexes, literal)

    def matches_at(self, names: Sequence[str], i: int) -> bool:
        """Whether the rule's names are the path's from index ``i`` on."""
        k = len(self.parts)
        if len(names) - i < k or (self.anchored and i != 0):
            return False
        if self.literal:
            return tuple(names[i : i + k]) == self.parts
        return all(rx.match(names[i + j]) for j, rx in enumerate(self.regexes))


def _rules(patterns: Iterable[str]) -> tuple[_Rule, ...]:
    seen: dict[tuple[bool, tuple[str, ...]], _Rule] = {}
    for pattern in patterns:
        rule = _Rule.parse(pattern)
        seen.setdefault((rule.anchored, rule.parts), rule)
    return tuple(seen.values())


class _RuleSet:
    """Rules indexed by their first name: a path costs a dict lookup per name, plus
    the few rules with wildcards (``*.pem``)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.rules = _rules(patterns)
        self._by_first: dict[str, list[_Rule]] = {}
        self._globs = [r for r in self.rules if not r.literal]
        for rule in self.rules:
            if rule.literal:
                self._by_first.setdefault(rule.parts[0], []).append(rule)

    def match(self, names: Sequence[str]) -> _Rule | None:
        """The rule naming this path (folded names) or one of its ancestors."""
        for i, name in enumerate(names):
            for rule in self._by_first.get(name, ()):
                if rule.matches_at(names, i):
                    return rule
        for rule in self._globs:
            if any(rule.matches_at(names, i) for i in range(len(names))):
                return rule
        return None


class Policy:
    """Compiled rules: ``hidden(path)`` and ``write_refusal(path)`` on root-relative paths."""

    def __init__(
        self,
        protect: Iterable[str],
        hide: Iterable[str],
        read_only: bool = False,
        options: PolicyOptions | None = None,
    ) -> None:
        self.protect = _RuleSet(protect)
        self.hide = _RuleSet(hide)
        self.read_only = read_only
        self.options = options or PolicyOptions(read_only=read_only)  # what it was made of

    @classmethod
    def from_options(cls, options: PolicyOptions) -> Policy:
        """Defaults plus the user's rules, minus the protections ``allow_write`` lifts."""
        protect = list(_rules((*DEFAULT_PROTECT, *options.protect)))
        for pattern in options.allow_write:
            key = _split_pattern(pattern)
            kept = [r for r in protect if (r.anchored, r.parts) != key]
            if len(kept) == len(protect):
                raise PolicyError(
                    f"--allow-write {pattern}: not a protection rule; the rules are: "
                    + " ".join(r.text for r in protect)
                )
            protect = kept
        hide = (*DEFAULT_HIDE, *options.hide)
        return cls([r.text for r in protect], hide, options.read_only, options)

    def rules(self) -> tuple[list[str], list[str], bool]:
        """(protect, hide, read_only) as text, for the agent to compile the same policy."""
        protect, hide = self.protect.rules, self.hide.rules
        return [r.text for r in protect], [r.text for r in hide], self.read_only

    def hidden(self, path: bytes) -> bool:
        return self.hide.match(_names(path)) is not None

    def write_refusal(self, path: bytes) -> str | None:
        """Why the remote may not change ``path`` (create, write, chmod, delete, rename
        to or from, mkdir or symlink at), or None when it may."""
        if self.read_only:
            return "read-only root"
        names = _names(path)
        rule = self.hide.match(names)
        if rule is not None:
            return f"hidden: {rule.text}"
        rule = self.protect.match(names)
        return None if rule is None else f"protected: {rule.text}"

    def symlink_refusal(self, link: bytes, target: bytes) -> str | None:
        """Why the remote may not make a symlink at ``link`` to ``target``: the client
        never follows one, but a later local program may, so it must not lead out of
        the root or to what the remote may not change."""
        why = self.write_refusal(link)
        if why is not None:
            return why
        resolved = link_target(link, target)
        if resolved is None:
            return "a link out of the root"
        why = self.write_refusal(resolved)
        return None if why is None else f"a link to {resolved.decode(errors='replace')}, {why}"


def link_target(link: bytes, target: bytes) -> bytes | None:
    """Where a symlink at ``link`` points, root-relative and resolved by name (without
    following other links), or None when it points outside the root (absolute, or
    climbing above it): such a link means something else on each side."""
    if target.startswith(b"/"):
        return None
    parts = link.split(b"/")[:-1]
    for name in target.split(b"/"):
        if name in (b"", b"."):
            continue
        if name == b"..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(name)
    return b"/".join(parts)


def _names(path: bytes) -> list[str]:
    return [fold(part) for part in path.split(b"/") if part]


def safe_mode(mode: int) -> int:
    """The permission bits the client applies: never setuid, setgid or sticky."""
    return mode & PERMISSION_BITS


# --- refusals: collected while the job runs, reported once at its end -------------------


@dataclass(frozen=True)
class Refusal:
    path: bytes
    op: str
    why: str


class RefusalLog:
    """The refusals of a session in order, numbered, the newest ``MAX_REFUSALS_KEPT``."""

    def __init__(self) -> None:
        self._items: deque[tuple[int, Refusal]] = deque(maxlen=MAX_REFUSALS_KEPT)
        self.count = 0

    def add(self, refusal: Refusal) -> None:
        self._items.append((self.count, refusal))
        self.count += 1

    def since(self, mark: int) -> list[Refusal]:
        """Those recorded since ``count`` was ``mark`` (what a job's run saw)."""
        return [r for n, r in self._items if n >= mark]


def summarize(refusals: Iterable[Refusal]) -> list[str]:
    """One line per refused path, in first-seen order, with what was tried and why;
    the remote's names shown with control characters escaped."""
    by_path: dict[bytes, tuple[list[str], str]] = {}
    for r in refusals:
        ops, _ = by_path.setdefault(r.path, ([], r.why))
        if r.op not in ops:
            ops.append(r.op)
    lines = [
        f"refused {', '.join(printable(op) for op in ops)} of {printable(path)} ({printable(why)})"
        for path, (ops, why) in list(by_path.items())[:MAX_REFUSALS_KEPT]
    ]
    if len(by_path) > MAX_REFUSALS_KEPT:
        lines.append(f"... and {len(by_path) - MAX_REFUSALS_KEPT} more refused paths")
    return lines


# --- the root -------------------------------------------------------------------------


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def root_refusal(root: str, home: str | None, allow_home: bool) -> str | None:
    """Why ``root`` (resolved, absolute) may not be exposed to the remote, or None.

    Not ``/``, not a system directory, inside or containing one; not the home
    directory or an ancestor of it unless ``allow_home`` (a job under ``$HOME`` would
    see every project, dotfile and key beneath it)."""
    if root == "/":
        return "the root may not be / (the whole system)"
    if not any(_within(root, scratch) for scratch in SCRATCH_DIRS):
        for system in SYSTEM_DIRS:
            if _within(root, system) or _within(system, root):
                return f"the root may not be a system directory or contain one ({system})"
    if home and home != "/" and _within(home, root) and not allow_home:
        what = "your home directory" if root == home else f"an ancestor of your home {home}"
        return f"{root} is {what}; pass --allow-home to expose it to the remote"
    return None
