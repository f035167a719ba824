"""``topyaz-mount setup``: make a host ready, so no later command needs ``--remote-python``.

Three ssh round trips, no agent: a probe (a shell loop that finds a Python ≥ 3.10, then
a Python snippet that reports what the host has), the venv (made afresh under the
remote user's data dir, named by this client's exact version so versions coexist, and
a check whether its pip reaches a package index), and the install (a tar of wheels on
ssh's stdin, unpacked and installed by the venv's pip). topyaz-mount is on no index, so
its own wheel always travels from here; its dependencies come from the host's index
when it reaches one, otherwise from this client: wheels downloaded for the host's
platform and Python, and, for packages that only come as source (pyfuse3), a wheel
built here when this machine matches the host, else the source for the host to build.
What neither side can provide is named with the command that fixes it.

The venv counts as ready only once a marker file naming the version and the wheel's
hash is written after pip succeeded, so an interrupted setup is redone, not trusted.
"""

from __future__ import annotations

import base64
import csv
import email.parser
import hashlib
import importlib.metadata
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..agent import fusecheck, hostdirs
from ..errors import AgentUnavailable
from ..safetext import printable
from .config import human_size
from .transport import SshSettings, run_remote_json

READY_MARKER = ".topyaz-mount-ready"
DIST_NAME = "topyaz-mount"

# Requirements with no binary wheels on any index, and the Debian package of the headers
# building them needs on the host (install_command maps it for dnf).
BUILT_FROM_SOURCE = {"pyfuse3": "libfuse3-dev"}

# Finds a Python >= 3.10 and runs the probe with it; $1 is the client's version.
_CANDIDATES = (
    "python3 python3.13 python3.12 python3.11 python3.10 "
    "/usr/bin/python3 /usr/local/bin/python3 /opt/homebrew/bin/python3"
)
_FIND_PYTHON = r"""
for py in $CANDIDATES; do
  command -v "$py" >/dev/null 2>&1 || continue
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || continue
  exec "$py" -c "$PROBE" "$1"
done
echo '{"python": null}'
"""


def _module_source(module: Any) -> str:
    """A self-contained module's source, to run ahead of a script (no __future__ line:
    that must come first, and Python >= 3.10 needs none for these annotations)."""
    lines = Path(module.__file__).read_text().splitlines()
    return "\n".join(x for x in lines if not x.startswith("from __future__")) + "\n"


# What the host has, as one JSON line. Runs on the host's own Python: standard library
# only. It starts with agent/hostdirs.py and agent/fusecheck.py, so it puts the venv
# where the agent looks and judges FUSE as the agent's ``auto`` does.
_PROBE = _module_source(hostdirs) + _module_source(fusecheck) + r"""
import ctypes.util, importlib.util, json, os, platform, shutil, subprocess, sys, sysconfig
version = sys.argv[1]
base = data_dir()
venv = os.path.join(base, "venv-" + version)
ready = None
try:
    with open(os.path.join(venv, ".topyaz-mount-ready")) as f:
        ready = json.load(f)
    if not os.access(os.path.join(venv, "bin", "python"), os.X_OK):
        ready = None
except (OSError, ValueError):
    pass
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (AttributeError, ValueError, OSError):
    libc = ""
def pkg_config(name):
    try:
        return subprocess.run(["pkg-config", "--exists", name]).returncode == 0
    except OSError:
        return False
impl = sys.implementation
python = sys.executable
if os.path.realpath(sys.prefix) == os.path.realpath(venv):  # the venv setup remakes
    python = getattr(sys, "_base_executable", python)
print(json.dumps({
    "python": python,
    "version": platform.python_version(),
    "abi": impl.cache_tag.replace("cpython-", "cp") if impl.name == "cpython" else "",
    "platform": sysconfig.get_platform(),
    "libc": libc,
    "markers": {
        "implementation_name": impl.name,
        "implementation_version": platform.python_version(),
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_full_version": platform.python_version(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    },
    "venv": venv,
    "ready": ready,
    "others": sorted(n[5:] for n in os.listdir(base) if n.startswith("venv-"))
    if os.path.isdir(base) else [],
    "has_venv": bool(importlib.util.find_spec("venv") and importlib.util.find_spec("ensurepip")),
    "compiler": bool(shutil.which("cc") or shutil.which("gcc")),
    "python_headers": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
    "pkg_config": bool(shutil.which("pkg-config")),
    "fuse3_headers": pkg_config("fuse3"),
    "libfuse3": bool(ctypes.util.find_library("fuse3")),
    "fuse_problem": fuse_problem(),
    "apt": bool(shutil.which("apt-get")),
    "dnf": bool(shutil.which("dnf")),
}))
"""

# Makes the venv afresh and asks its pip whether an index answers; argv: venv path.
_MAKE_VENV = r"""
import json, os, shutil, subprocess, sys
venv = sys.argv[1]
shutil.rmtree(venv, ignore_errors=True)
os.makedirs(os.path.dirname(venv), exist_ok=True)
made = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True)
if made.returncode != 0:
    print(json.dumps({"ok": False, "error": (made.stderr.strip().splitlines() or ["?"])[-1]}))
    sys.exit(0)
reach = subprocess.run(
    [os.path.join(venv, "bin", "python"), "-m", "pip", "index", "versions", "msgspec",
     "--disable-pip-version-check", "--retries", "0", "--timeout", "10"],
    capture_output=True, text=True,
)
lines = [x for x in reach.stderr.splitlines() if x.strip() and "experimental" not in x]
print(json.dumps({"ok": True, "online": reach.returncode == 0, "why": lines[-1] if lines else ""}))
"""

# Runs in the new venv: unpack the wheels from stdin, pip install, write the marker.
# argv: online (1/0), the own wheel's file name with its extras, the marker's JSON.
_INSTALL = r"""
import json, os, re, shutil, subprocess, sys, tarfile, tempfile
online, own, marker = sys.argv[1] == "1", sys.argv[2], sys.argv[3]
house = tempfile.mkdtemp(prefix="wheelhouse-", dir=sys.prefix)
try:
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(house, filter="data")
        else:
            tar.extractall(house)
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
           "--find-links", house]
    if not online:
        cmd.append("--no-index")
    cmd.append(os.path.join(house, own))
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errors = [x for x in done.stderr.splitlines() if x.startswith("ERROR")]
    if done.returncode == 0:
        tmp = os.path.join(sys.prefix, ".topyaz-mount-ready.new")
        with open(tmp, "w") as f:
            f.write(marker)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(sys.prefix, ".topyaz-mount-ready"))
    tail = errors or done.stderr.strip().splitlines()[-3:]
    missing = re.findall(r"No matching distribution found for ([^;\s]+)", done.stderr)
    print(json.dumps({"ok": done.returncode == 0, "error": " / ".join(tail), "missing": missing}))
finally:
    shutil.rmtree(house, ignore_errors=True)
"""


class SetupFailed(AgentUnavailable):
    """The host cannot be set up; the message names what is missing and the fix."""


@dataclass(frozen=True)
class HostFacts:
    """What the probe found on the host."""

    raw: dict[str, Any]

    @property
    def python(self) -> str | None:
        return self.raw.get("python")

    @property
    def venv(self) -> str:
        return str(self.raw["venv"])

    @property
    def venv_python(self) -> str:
        return f"{self.venv}/bin/python"

    @property
    def short_version(self) -> str:
        return str(self.raw["markers"]["python_version"])

    def ready_for(self, wheel_hash: str | None, backend: str | None = None) -> bool:
        """Set up for this client: the version, and (when known) this very wheel and
        backend (a venv made without pyfuse3 is not ready for FUSE)."""
        ready = self.raw.get("ready") or {}
        if ready.get("version") != __version__:
            return False
        if backend is not None and ready.get("backend", "fuse") != backend:
            return False
        return wheel_hash is None or ready.get("wheel") == wheel_hash

    def backend_for(self, asked: str | None) -> tuple[str, str | None]:
        """The backend to install for (``fuse`` or ``stage``) given what was asked
        (flag or profile), and why FUSE is out when it is.

        Raises SetupFailed when FUSE is asked for and the host cannot mount it."""
        problem = self.raw.get("fuse_problem")
        if asked == "stage":
            return "stage", None
        if problem and asked == "fuse":
            raise SetupFailed(printable(f"FUSE is not usable on the host: {problem}"))
        return ("stage", str(problem)) if problem else ("fuse", None)

    def same_platform_as_here(self) -> bool:
        """Can a wheel built on this machine run there?"""
        import sysconfig

        here_abi = sys.implementation.cache_tag.replace("cpython-", "cp")
        return (
            here_abi == self.raw.get("abi")
            and sysconfig.get_platform() == self.raw.get("platform")
            and _libc_tuple(_local_libc()) <= _libc_tuple(str(self.raw.get("libc", "")))
        )

    def pip_platforms(self) -> list[str]:
        """``pip download --platform`` values for the host: every manylinux its glibc
        runs, newest first (pip does not widen one itself), and the plain platform."""
        plat = str(self.raw.get("platform", "")).replace("-", "_").replace(".", "_")
        libc = _libc_tuple(str(self.raw.get("libc", "")))
        if not (plat.startswith("linux_") and len(libc) == 2 and libc[0] == 2):
            return [plat]
        arch = plat.removeprefix("linux_")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags = []
        for minor in range(libc[1], 4, -1):
            tags.append(f"manylinux_2_{minor}_{arch}")
            if minor in legacy:
                tags.append(f"{legacy[minor]}_{arch}")
        return [*tags, plat]

    def build_problems(self) -> list[str]:
        """What the host lacks to compile a C extension against libfuse3."""
        r = self.raw
        missing = [
            label
            for ok, label in (
                (r.get("compiler"), "a C compiler"),
                (r.get("python_headers"), "the Python headers"),
                (r.get("pkg_config"), "pkg-config"),
                (r.get("fuse3_headers"), "the libfuse3 headers"),
            )
            if not ok
        ]
        return missing

    def install_command(self, *what: str) -> str:
        """The package manager line that installs ``what`` (Debian names, dnf mapped)."""
        dnf = {
            "libfuse3-dev": "fuse3-devel",
            "python3-dev": "python3-devel",
            "pkg-config": "pkgconf",
            "python3-venv": "python3",
        }
        if self.raw.get("dnf") and not self.raw.get("apt"):
            return "dnf install " + " ".join(dict.fromkeys(dnf.get(w, w) for w in what))
        return "apt-get install " + " ".join(what)


def _local_libc() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return ""


def _libc_tuple(text: str) -> tuple[int, ...]:
    """``glibc 2.36`` -> (2, 36); () when not glibc."""
    name, _, version = text.partition(" ")
    if name != "glibc":
        return ()
    try:
        return tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return ()


@dataclass(frozen=True)
class SetupRequest:
    settings: SshSettings
    check_only: bool = False
    say: Callable[[str], None] = print
    python: str | None = None  # make the venv from this interpreter instead of probing
    backend: str | None = None  # as asked (flag or profile): auto, fuse or stage


@dataclass(frozen=True)
class SetupResult:
    ready: bool
    venv_python: str | None  # what the profile's remote_python becomes
    backend: str | None = None  # what the venv was made for: fuse, or stage (no pyfuse3)


def probe(settings: SshSettings, python: str | None = None) -> HostFacts:
    """What the host has (one ssh round trip, read-only)."""
    candidates = shlex.quote(python) if python else _CANDIDATES
    script = f"PROBE={shlex.quote(_PROBE)}\nCANDIDATES={shlex.quote(candidates)}\n{_FIND_PYTHON}"
    command = f"sh -s -- {shlex.quote(__version__)}"
    facts = HostFacts(run_remote_json(settings, command=command, stdin=script.encode()))
    if not facts.python:
        raise SetupFailed(
            f"no Python >= 3.10 on {settings.remote}: install one there "
            f"(`apt-get install python3 python3-venv`)"
        )
    return facts


# --- the client's own wheel -----------------------------------------------------------


def wheel_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("topyaz-mount")) / "wheels"


def _source_tree() -> Path | None:
    """The checkout this package runs from, if it runs from one."""
    root = Path(__file__).resolve().parents[2]  # topyaz_mount/client/hostsetup.py
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return root if f'name = "{DIST_NAME}"' in text else None


def wheel_sources(root: Path) -> list[Path]:
    """What goes into the wheel of the checkout at ``root``: one list for the digest
    and for the build, so a file that is not in the tree cannot reach the wheel."""
    files = [root / "pyproject.toml", root / "README.md"]
    files += sorted(
        p
        for p in (root / "topyaz_mount").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    return files


def tree_digest(root: Path) -> str:
    """A digest of what goes into the wheel of the checkout at ``root``, so an unchanged
    tree is not built again (here, and by the test host: tools/testhost.py)."""
    h = hashlib.sha256()
    for path in wheel_sources(root):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheel(root: Path, dest: Path) -> Path:
    """Build the checkout's wheel into ``dest`` from a copy of ``wheel_sources``.

    Not in place: an in-tree build reuses the checkout's ``build/``, where a module
    that was moved or removed since the last build still sits and would be packed.
    """
    with tempfile.TemporaryDirectory(prefix="topyaz-mount-src-") as src:
        for path in wheel_sources(root):
            copy = Path(src, path.relative_to(root))
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
        _pip("wheel", "-q", "--no-deps", "-w", str(dest), src)
    return sorted(dest.glob("topyaz_mount-*.whl"))[0]


def _build_from_source(root: Path) -> Path:
    out = wheel_cache_dir() / f"src-{tree_digest(root)}"
    found = sorted(out.glob("topyaz_mount-*.whl"))
    if found:
        return found[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        build_wheel(root, tmp)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in out.parent.glob("src-*"):  # wheels of the tree's earlier contents
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    return sorted(out.glob("topyaz_mount-*.whl"))[0]


def _repack_installed(dest: Path) -> Path | None:
    """A wheel of the installed (non-editable) distribution, from its RECORD."""
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or () if not str(f).startswith("..")]
    if not any(str(f) == "topyaz_mount/__init__.py" for f in files):
        return None  # an editable install: nothing to pack
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    dist_info = f"topyaz_mount-{dist.version}.dist-info"
    name = f"topyaz_mount-{dist.version}-py3-none-any.whl"
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{name}.new"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            parts = f.parts
            if "__pycache__" in parts or (parts[0].endswith(".dist-info") and f.name in skip):
                continue
            arcname = "/".join(
                (dist_info, *parts[1:]) if parts[0].endswith(".dist-info") else parts
            )
            data = Path(str(f.locate())).read_bytes()
            zf.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            writer.writerow([arcname, f"sha256={digest.decode()}", len(data)])
        writer.writerow([f"{dist_info}/RECORD", "", ""])
        zf.writestr(f"{dist_info}/RECORD", record.getvalue())
    return tmp.rename(dest / name)


def own_wheel() -> Path:
    """This client's own wheel: built from its checkout, cached, or repacked."""
    root = _source_tree()
    if root is not None:
        return _build_from_source(root)
    cached = wheel_cache_dir() / f"topyaz_mount-{__version__}-py3-none-any.whl"
    if cached.exists():
        return cached
    made = _repack_installed(wheel_cache_dir())
    if made is None:
        raise SetupFailed(
            f"no wheel of topyaz-mount {__version__} to install on the host: put one at "
            f"{cached}, or run setup from a checkout or a non-editable install"
        )
    return made


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- what to upload -------------------------------------------------------------------


def _pip(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        errors = [x for x in done.stderr.splitlines() if x.startswith("ERROR")]
        tail = errors or done.stderr.strip().splitlines()[-2:] or ["no message"]
        raise SetupFailed(f"pip {args[0]} here failed: {' / '.join(tail)}")
    return done


def host_requirements(wheel: Path, facts: HostFacts, extra: str = "remote") -> list[str]:
    """The own wheel's requirements (with ``extra``: the ``[remote]`` ones, pyfuse3)
    that apply on the host (its markers)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(zf.read(meta).decode())
    env = {**facts.raw["markers"], "extra": extra}
    wanted = []
    for line in message.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            wanted.append(str(req))
    return wanted


def _bare(requirement: str) -> str:
    """A requirement pip named, without its marker (evaluated on the host already)."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        raise SetupFailed(f"the host's pip asked for {printable(requirement)!r}") from None
    req.marker = None
    return str(req)


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower().replace("_", "-")


def _local_build(requirement: str, house: Path) -> None:
    """A wheel built on this machine (the host's platform), pinned to the version here."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    try:
        have = importlib.metadata.version(req.name)
        if req.specifier.contains(have, prereleases=True):
            requirement = f"{req.name}=={have}"
    except importlib.metadata.PackageNotFoundError:
        pass
    _pip("wheel", "-q", "--no-deps", "-w", str(house), requirement)


def _host_cannot_build(settings: SshSettings, facts: HostFacts, name: str, why: str) -> SetupFailed:
    missing = facts.build_problems()
    fix = facts.install_command("gcc", "python3-dev", "pkg-config", BUILT_FROM_SOURCE[name])
    return SetupFailed(
        f"{name} must be compiled on {settings.remote} ({why}), which lacks "
        f"{', '.join(missing)}: run `{fix}` there"
    )


def gather(
    settings: SshSettings,
    facts: HostFacts,
    wheel: Path,
    online: bool,
    house: Path,
    backend: str = "fuse",
) -> list[str]:
    """Put into ``house`` what the host cannot get itself; the notes on what was done."""
    shutil.copy2(wheel, house / wheel.name)
    notes = [f"its own wheel {wheel.name}"]
    reqs = host_requirements(wheel, facts, "remote" if backend == "fuse" else "")
    from_source = [r for r in reqs if _name(r) in BUILT_FROM_SOURCE]
    host_builds = not facts.build_problems()
    for req in from_source:
        name = _name(req)
        if online and host_builds:
            continue  # the host fetches the source and compiles it
        if facts.same_platform_as_here():
            _local_build(req, house)
            notes.append(f"{name} built here (same platform and Python as the host)")
        elif host_builds:
            _pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(house), req)
            notes.append(f"{name} source (compiled on the host)")
            if not online:  # the host's pip builds it in isolation: its build requirements
                reqs += build_requires(next(house.glob(f"{name}-*.tar.gz")))
        else:
            why = "no binary wheel exists and this machine's platform or Python differs"
            raise _host_cannot_build(settings, facts, name, why)
    if online:
        return notes
    count = download_binary(facts, house, [r for r in reqs if r not in from_source])
    notes.append(f"{count} wheels downloaded for {facts.pip_platforms()[0]}")
    return notes


def download_binary(facts: HostFacts, house: Path, requirements: list[str]) -> int:
    """Wheels for the host's platform and Python (and their dependencies) into ``house``.

    pip evaluates the dependencies' markers for this interpreter, not the host's, so a
    host on another Python may still lack one: the install names it and ``setup_host``
    comes back here for it.
    """
    before = len(list(house.iterdir()))
    abi = str(facts.raw.get("abi") or "")
    _pip(
        "download",
        "-q",
        "--only-binary=:all:",
        "-d",
        str(house),
        f"--python-version={facts.short_version}",
        *(f"--platform={p}" for p in facts.pip_platforms()),
        *(["--implementation=cp", f"--abi={abi}"] if abi else []),
        *requirements,
    )
    return len(list(house.iterdir())) - before


def build_requires(sdist: Path) -> list[str]:
    """``[build-system] requires`` of a source distribution (PEP 518)."""
    from .config import tomllib

    with tarfile.open(sdist) as tar:
        member = next(
            (
                m
                for m in tar.getmembers()
                if m.name.count("/") == 1 and m.name.endswith("/pyproject.toml")
            ),
            None,
        )
        data = tar.extractfile(member) if member is not None else None
        if data is None:
            return ["setuptools>=40.8", "wheel"]
        requires = tomllib.loads(data.read().decode()).get("build-system", {}).get("requires")
    return [str(r) for r in requires] if isinstance(requires, list) else ["setuptools", "wheel"]


def _tar(house: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(house.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


def setup_host(req: SetupRequest) -> SetupResult:
    """Probe; if not ready (and not ``check_only``) make the venv and install."""
    started = time.monotonic()
    settings = req.settings

    def say(text: str) -> None:  # the host chose much of what is said: no raw controls
        req.say(printable(text))

    host = settings.remote
    facts = probe(settings, req.python)
    say(
        f"{host}: Python {facts.raw['version']} at {facts.python} "
        f"({facts.raw['platform']}, {facts.raw.get('libc') or 'no glibc'})"
    )
    if req.check_only:
        ready = facts.ready_for(None)
        if ready:
            say(f"{host}: topyaz-mount {__version__} is set up in {facts.venv}")
        else:
            others = ", ".join(facts.raw.get("others") or []) or "none"
            say(
                f"{host}: topyaz-mount {__version__} is not set up (versions there: {others}); "
                f"run `topyaz-mount setup --remote {host}`"
            )
        return SetupResult(ready, facts.venv_python if ready else None)
    backend, no_fuse = facts.backend_for(req.backend)
    wheel = own_wheel()
    wheel_hash = _sha256(wheel)
    if facts.ready_for(wheel_hash, backend):
        elapsed = time.monotonic() - started
        say(
            f"{host}: topyaz-mount {__version__} is set up already in {facts.venv}; nothing "
            f"to do (checked in {elapsed:.1f} s)"
        )
        return SetupResult(True, facts.venv_python, backend)
    if not facts.raw.get("has_venv"):
        fix = facts.install_command("python3-venv")
        raise SetupFailed(
            printable(f"{facts.python} on {host} cannot make a venv: run `{fix}` there")
        )
    if backend == "stage":
        why = f"FUSE is not usable there ({no_fuse})" if no_fuse else "--backend stage"
        say(f"{host}: {why}: installing without pyfuse3; jobs stage their files")
    elif not facts.raw.get("libfuse3"):
        raise SetupFailed(f"{host} lacks libfuse3: run `{facts.install_command('fuse3')}` there")
    made = run_remote_json(
        settings,
        command=f"exec {shlex.quote(facts.python or 'python3')} -c {shlex.quote(_MAKE_VENV)} "
        f"{shlex.quote(facts.venv)}",
    )
    if not made.get("ok"):
        raise SetupFailed(
            printable(f"cannot make a venv at {facts.venv} on {host}: {made.get('error')}")
        )
    online = bool(made.get("online"))
    mode = "online" if online else "offline"
    say(
        f"{host}: made {facts.venv}; "
        + (
            "its pip reaches a package index: dependencies come from there"
            if online
            else f"its pip reaches no package index ({made.get('why') or 'no answer'}): "
            f"uploading the dependencies from here"
        )
    )
    marker = json.dumps(
        {"version": __version__, "wheel": wheel_hash, "mode": mode, "backend": backend}
    )
    own = wheel.name + ("[remote]" if backend == "fuse" else "")
    command = " ".join(
        shlex.quote(w)
        for w in (facts.venv_python, "-c", _INSTALL, "1" if online else "0", own, marker)
    )
    with tempfile.TemporaryDirectory(prefix="topyaz-mount-setup-") as tmp:
        house = Path(tmp)
        notes = gather(settings, facts, wheel, online, house, backend)
        for attempt in range(1, 5):
            payload = _tar(house)
            say(f"{host}: uploading {human_size(len(payload))}: {'; '.join(notes)}")
            done = run_remote_json(settings, 1800, command=f"exec {command}", stdin=payload)
            if done.get("ok"):
                break
            missing = [_bare(str(m)) for m in done.get("missing") or []]
            if online or not missing or attempt == 4:
                error = str(done.get("error") or "no message")
                raise SetupFailed(f"pip install on {host} failed: {printable(error)}")
            count = download_binary(facts, house, missing)
            notes = [f"{count} more wheels its pip asked for ({', '.join(missing)})"]
    elapsed = time.monotonic() - started
    say(f"{host}: installed topyaz-mount {__version__} ({mode}) in {elapsed:.1f} s")
    return SetupResult(True, facts.venv_python, backend)
