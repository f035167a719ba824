#!/usr/bin/env python3
"""A throwaway OpenSSH server on 127.0.0.1 that plays "the remote GPU host".

Importable (the test suite uses it) and runnable as a script:

    python tools/testhost.py setup                      # user, venv, package copy, stand-ins
    python tools/testhost.py start [--state-dir DIR]    # setup + sshd in the foreground
    python tools/testhost.py stop --state-dir DIR       # stop the sshd started with DIR

`start` prints `--remote ...`, `--ssh-config ...`, `--remote-python ...` and the sshd
pid, one per line, writes DIR/env.sh (TM_REMOTE, TM_SSH_CONFIG, TM_REMOTE_PYTHON,
TM_SSHD_PID) and runs until SIGINT/SIGTERM, then stops sshd.

Everything here must run as root: it creates the login user `tmremote`, a shared
venv under /opt/topyaz-mount-testhost and opens /dev/fuse to unprivileged users.

How the remote PATH is set: sshd runs with `PermitUserEnvironment yes` and
~tmremote/.ssh/environment holds PATH=<venv/bin>:<stand-in bin>:<system path> (and
XDG_RUNTIME_DIR=/run/user/UID, which a PAM/logind login would normally provide).
sshd applies that file to every session, including `ssh host COMMAND`, so plain
`python3`, `tpai`, `gigapixel`, `topyaz` and `tvai-ffmpeg` resolve to the test host's copies.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
REPO_DIR = TOOLS_DIR.parent
PACKAGE_SRC = REPO_DIR / "topyaz_mount"
STANDINS_SRC = TOOLS_DIR / "standins"
STANDIN_NAMES = ("tpai", "gigapixel", "topyaz", "tvai-ffmpeg")

# TOPYAZ_MOUNT_TESTHOST_USER gives a test host of its own (user, venv, stand-ins, remote
# cache) to a second checkout whose suite runs at the same time as this one's.
REMOTE_USER = os.environ.get("TOPYAZ_MOUNT_TESTHOST_USER", "tmremote")
BASE_DIR = Path(
    "/opt/topyaz-mount-testhost"
    if REMOTE_USER == "tmremote"
    else f"/opt/topyaz-mount-testhost-{REMOTE_USER}"
)
VENV_DIR = BASE_DIR / "venv"
VENV_PYTHON = VENV_DIR / "bin" / "python"
BIN_DIR = BASE_DIR / "bin"
LOCK_FILE = BASE_DIR / ".setup.lock"
REQ_MARKER = VENV_DIR / "testhost-requirements.txt"
SYSTEM_PYTHON = "/usr/bin/python3"
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
REMOTE_PATH_TAIL = "/usr/local/bin:/usr/bin:/bin"
PROFILE_MARKER = "# added by topyaz-mount tools/testhost.py"

# What the remote venv needs: the agent side of topyaz_mount (pyfuse3 + the package's
# runtime deps, click included because the package's CLI module may be imported) and
# Pillow for the stand-ins. Each is pinned to the version installed in the interpreter
# running this file, when there is one, so remote and local outputs match byte for byte.
REMOTE_PACKAGES = ("pyfuse3", "trio", "msgspec", "blake3", "platformdirs", "pillow", "click")

SSH_OPTIONS_BASE = {
    "IdentitiesOnly": "yes",
    "BatchMode": "yes",
    "StrictHostKeyChecking": "no",
    "UserKnownHostsFile": "/dev/null",
    "LogLevel": "ERROR",
}


class TestHostError(RuntimeError):
    """The test host could not be set up or started."""


# --------------------------------------------------------------------------- helpers


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run argv, raising TestHostError with its output when it fails."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    kw.setdefault("text", True)
    proc = subprocess.run(argv, **kw)
    if proc.returncode != 0:
        out = (proc.stdout or "").strip()[-3000:]
        raise TestHostError(f"{shlex.join(argv)} failed with exit {proc.returncode}\n{out}")
    return proc


def _clean_env() -> dict[str, str]:
    """Environment for running the venv's python/pip (no pyenv/venv leakage)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.pop("PYENV_VERSION", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def require_root() -> None:
    if os.geteuid() != 0:
        raise TestHostError(
            "testhost must run as root (it creates user tmremote, /opt/topyaz-mount-testhost "
            "and an sshd); rerun with sudo or as root"
        )


@contextlib.contextmanager
def _setup_lock() -> Iterator[None]:
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(BASE_DIR, 0o755)
    with open(LOCK_FILE, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _make_world_readable(root: Path) -> None:
    """chmod a+rX recursively (directories and executables get a+x)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            mode = os.stat(p).st_mode
            extra = 0o444
            if os.path.isdir(p) or mode & 0o111:
                extra |= 0o111
            if mode & extra != extra:
                os.chmod(p, (mode | extra) & 0o7777)
    os.chmod(root, os.stat(root).st_mode | 0o555)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_our_sshd(pid: int, config: Path) -> bool:
    """True if pid is an sshd started with our config (guards against pid reuse)."""
    # sshd rewrites its argv into one string ("sshd: /usr/sbin/sshd -D -e -f CONFIG
    # [listener] ..."), so look for the config path among whitespace-separated words.
    try:
        if os.readlink(f"/proc/{pid}/exe") != SSHD:
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            words = fh.read().replace(b"\0", b" ").split()
    except OSError:
        return False
    return str(config).encode() in words


def _is_testhost_runner(pid: int, state_dir: Path) -> bool:
    """True if pid is a `testhost.py start` process (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"testhost.py") for a in args) and b"start" in args


def _kill_pid(pid: int, popen: subprocess.Popen | None = None, timeout: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL one process by its pid."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                return
        elif not _pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=timeout)


def _unescape_mount_field(field: str) -> str:
    r"""/proc/mounts escapes space, tab, newline and backslash as \ooo octal."""
    out, i = bytearray(), 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- setup


def ensure_user() -> pwd.struct_passwd:
    """Create (if needed) the unprivileged login user and unlock it for key logins."""
    try:
        pw = pwd.getpwnam(REMOTE_USER)
    except KeyError:
        _run(["useradd", "-m", "-s", "/bin/bash", REMOTE_USER])
        pw = pwd.getpwnam(REMOTE_USER)
    # A useradd'ed account is locked ("!"), and sshd with UsePAM no refuses locked
    # accounts even for public keys. "*" means: no password, but not locked.
    with open("/etc/shadow") as fh:
        shadow_hash = next((ln.split(":")[1] for ln in fh if ln.startswith(REMOTE_USER + ":")), "")
    if shadow_hash != "*":
        _run(["usermod", "-p", "*", REMOTE_USER])
    home = Path(pw.pw_dir)
    home.mkdir(mode=0o755, exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    os.chmod(home, 0o755)
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
    os.chmod(ssh_dir, 0o700)
    # What pam_systemd would create for a real login; platformdirs' runtime dir.
    run_user = Path(f"/run/user/{pw.pw_uid}")
    run_user.mkdir(parents=True, exist_ok=True)
    os.chown(run_user, pw.pw_uid, pw.pw_gid)
    os.chmod(run_user, 0o700)
    env_lines = [
        f"PATH={VENV_DIR}/bin:{BIN_DIR}:{REMOTE_PATH_TAIL}",
        f"XDG_RUNTIME_DIR={run_user}",
    ]
    env_file = ssh_dir / "environment"
    env_file.write_text("\n".join(env_lines) + "\n")
    os.chown(env_file, pw.pw_uid, pw.pw_gid)
    os.chmod(env_file, 0o600)
    # Login shells (`ssh host` without a command, `bash -l`) run /etc/profile, which
    # resets PATH on Debian; ~/.profile puts our directories back in front.
    profile = home / ".profile"
    text = profile.read_text() if profile.exists() else ""
    if PROFILE_MARKER not in text:
        profile.write_text(
            text + f"\n{PROFILE_MARKER}\n"
            f'PATH="{VENV_DIR}/bin:{BIN_DIR}:$PATH"\nexport XDG_RUNTIME_DIR={run_user}\n'
        )
        os.chown(profile, pw.pw_uid, pw.pw_gid)
    return pw


def ensure_fuse_and_sshd_dirs() -> None:
    if os.path.exists("/dev/fuse"):
        os.chmod("/dev/fuse", 0o666)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


def _requirements() -> list[str]:
    reqs = []
    for name in REMOTE_PACKAGES:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def _venv_works() -> bool:
    if not VENV_PYTHON.exists():
        return False
    probe = subprocess.run(
        [str(VENV_PYTHON), "-c", "import sys; print(sys.prefix)"],
        capture_output=True, text=True, env=_clean_env(),
    )
    return probe.returncode == 0 and probe.stdout.strip() == str(VENV_DIR)


def ensure_venv(log=print) -> None:
    """World-readable venv from Debian's python with the remote packages installed."""
    if not os.path.exists(SYSTEM_PYTHON):
        raise TestHostError(f"{SYSTEM_PYTHON} missing: apt-get install python3 python3-venv")
    reqs = _requirements()
    wanted = "\n".join(reqs) + "\n"
    if _venv_works() and REQ_MARKER.exists() and REQ_MARKER.read_text() == wanted:
        return
    if not _venv_works():
        shutil.rmtree(VENV_DIR, ignore_errors=True)
        log(f"testhost: creating {VENV_DIR}")
        _run([SYSTEM_PYTHON, "-m", "venv", str(VENV_DIR)], env=_clean_env())
    REQ_MARKER.unlink(missing_ok=True)
    log(f"testhost: pip install {' '.join(reqs)} (pyfuse3 may compile, first time only)")
    _run(
        [str(VENV_PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--root-user-action=ignore", *reqs],
        env=_clean_env(),
    )
    REQ_MARKER.write_text(wanted)
    _make_world_readable(VENV_DIR)


def _hostsetup():
    """The repo's own hostsetup module (whatever topyaz_mount this interpreter may have
    installed): its rule for what goes into the wheel, and its build."""
    sys.path.insert(0, str(REPO_DIR))
    try:
        from topyaz_mount.client import hostsetup
    finally:
        sys.path.remove(str(REPO_DIR))
    return hostsetup


def build_wheel() -> Path:
    """The wheel of the repo's current tree (built once per content, kept under BASE_DIR).

    The remote side runs what users install: a wheel, installed non-editable, never
    the source tree. ``TOPYAZ_MOUNT_TESTHOST_WHEEL`` names a wheel built beforehand (CI's
    ``python -m build``), used as it is.
    """
    given = os.environ.get("TOPYAZ_MOUNT_TESTHOST_WHEEL")
    if given:
        return Path(given).resolve()
    hostsetup = _hostsetup()
    out = BASE_DIR / "wheels" / hostsetup.tree_digest(REPO_DIR)
    found = sorted(out.glob("topyaz_mount-*.whl"))
    if found:
        return found[0]
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="wheel-", dir=BASE_DIR))
    try:
        hostsetup.build_wheel(REPO_DIR, tmp)
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out.glob("topyaz_mount-*.whl"))[0]


def install_package() -> Path:
    """Install the repo's wheel into the remote venv (non-editable, no dependencies:
    ensure_venv pinned those)."""
    if not PACKAGE_SRC.is_dir():
        raise TestHostError(f"package directory {PACKAGE_SRC} not found")
    wheel = build_wheel()
    marker = VENV_DIR / "testhost-wheel.txt"
    stamp = f"{wheel}\n{wheel.stat().st_size} {wheel.stat().st_mtime_ns}\n"
    if not (marker.exists() and marker.read_text() == stamp):
        marker.unlink(missing_ok=True)
        # pip byte-compiles: tmremote cannot write __pycache__ there, and without it
        # every agent start would compile the whole package again.
        _run([str(VENV_PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "--root-user-action=ignore", "--no-deps", "--force-reinstall", str(wheel)],
             env=_clean_env())
        marker.write_text(stamp)
        _make_world_readable(VENV_DIR)
    return wheel


def install_standins() -> None:
    """Copy the stand-in CLIs to BIN_DIR with a shebang pointing at the venv python."""
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(BIN_DIR, 0o755)
    for name in STANDIN_NAMES:
        lines = (STANDINS_SRC / name).read_text().splitlines(keepends=True)
        if lines and lines[0].startswith("#!"):
            lines = lines[1:]
        text = f"#!{VENV_PYTHON}\n" + "".join(lines)
        tmp = BIN_DIR / f".{name}.new"
        tmp.write_text(text)
        os.chmod(tmp, 0o755)
        os.rename(tmp, BIN_DIR / name)


def setup(*, install_package_copy: bool = True, log=print) -> pwd.struct_passwd:
    """Everything except starting sshd. Idempotent and serialized by a lock file."""
    require_root()
    with _setup_lock():
        pw = ensure_user()
        ensure_fuse_and_sshd_dirs()
        ensure_venv(log=log)
        if install_package_copy:
            install_package()
        install_standins()
        _make_world_readable(BASE_DIR / "bin")
    return pw


# --------------------------------------------------------------------------- host


class TestHost:
    """A running sshd for user tmremote on 127.0.0.1."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, state_dir: Path, port: int, ssh_config: Path, client_key: Path,
                 proc: subprocess.Popen | None, pid: int, sshd_config: Path,
                 remove_state_dir: bool = False) -> None:
        self.state_dir = state_dir
        self.port = port
        self.ssh_config = ssh_config
        self.client_key = client_key
        self.sshd_config = sshd_config
        self.pid = pid
        self.remote_user = REMOTE_USER
        self.remote_host = "127.0.0.1"
        self.remote = f"{REMOTE_USER}@127.0.0.1:{port}"
        self.remote_python = str(VENV_PYTHON)
        self.ssh_options = _ssh_option_args(port, client_key)
        self.authorized_keys = _authorized_keys_path(state_dir, port)
        self._proc = proc
        self._remove_state_dir = remove_state_dir
        self._stopped = False

    def __repr__(self) -> str:
        return f"<TestHost {self.remote} pid={self.pid} state={self.state_dir}>"

    def __enter__(self) -> TestHost:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def ssh_argv(self) -> list[str]:
        """ssh argv ready to append a remote command to."""
        return ["ssh", "-F", str(self.ssh_config), "-p", str(self.port),
                f"{REMOTE_USER}@127.0.0.1"]

    def run(self, command: str, *, check: bool = False, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        """Run a shell command line on the test host as tmremote (text, captured)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([*self.ssh_argv(), command], check=check, timeout=timeout, **kw)

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return _pid_alive(self.pid) and _is_our_sshd(self.pid, self.sshd_config)

    def stop(self) -> None:
        """Stop sshd by its pid (SIGTERM, wait, SIGKILL). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._proc is not None:
            if self._proc.poll() is None:
                _kill_pid(self.pid, self._proc)
        elif _pid_alive(self.pid) and _is_our_sshd(self.pid, self.sshd_config):
            _kill_pid(self.pid)
        with contextlib.suppress(OSError):
            self.authorized_keys.unlink()
        if self._remove_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def remote_mounts(self) -> list[str]:
        """Mountpoints of FUSE filesystems mounted by the remote user.

        A FUSE mount made by an unprivileged user carries user_id=UID in its options;
        mounts below the user's home or /run/user/UID also count.
        """
        pw = pwd.getpwnam(REMOTE_USER)
        roots = (pw.pw_dir.rstrip("/") + "/", f"/run/user/{pw.pw_uid}/")
        found = []
        with open("/proc/mounts") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 4 or "fuse" not in fields[2]:
                    continue
                mountpoint = _unescape_mount_field(fields[1])
                opts = fields[3].split(",")
                if f"user_id={pw.pw_uid}" in opts or (mountpoint + "/").startswith(roots):
                    found.append(mountpoint)
        return found


def _ssh_option_pairs(port: int, client_key: Path) -> dict[str, str]:
    return {"Port": str(port), "User": REMOTE_USER, "IdentityFile": str(client_key),
            **SSH_OPTIONS_BASE}


def _ssh_option_args(port: int, client_key: Path) -> list[str]:
    args: list[str] = []
    for key, value in _ssh_option_pairs(port, client_key).items():
        args += ["-o", f"{key}={value}"]
    return args


def _authorized_keys_path(state_dir: Path, port: int) -> Path:
    return BASE_DIR / "authorized_keys" / f"{state_dir.name}-{port}"


def _write_state_files(state_dir: Path, port: int) -> tuple[Path, Path, Path]:
    """Keys, authorized_keys, sshd_config and ssh_config. Returns (sshd_config, ssh_config, key)."""
    host_key = state_dir / "ssh_host_ed25519_key"
    client_key = state_dir / "client_ed25519"
    keys = ((host_key, "topyaz-testhost-hostkey"), (client_key, "topyaz-testhost-client"))
    for key, comment in keys:
        if not key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])
        os.chmod(key, 0o600)
    # sshd reads AuthorizedKeysFile with the target user's uid, and the state dir is
    # 0700 root, so the authorized_keys lives in a world-traversable per-host dir.
    # It holds only a public key.
    authorized_keys = _authorized_keys_path(state_dir, port)
    authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(authorized_keys.parent, 0o755)
    authorized_keys.write_text((client_key.with_suffix(".pub")).read_text())
    os.chmod(authorized_keys, 0o644)
    (state_dir / "authorized_keys_path").write_text(str(authorized_keys) + "\n")

    sshd_config = state_dir / "sshd_config"
    sshd_config.write_text(
        "\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {port}",
            f"HostKey {host_key}",
            f"PidFile {state_dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized_keys}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            f"AllowUsers {REMOTE_USER}",
            "PermitUserEnvironment yes",
            f"Subsystem sftp {SFTP_SERVER}",
            "MaxSessions 50",
            "MaxStartups 50",
            "LogLevel ERROR",
            "X11Forwarding no",
            "PrintMotd no",
            "",
        ])
    )
    ssh_config = state_dir / "ssh_config"
    opts = _ssh_option_pairs(port, client_key)
    body = "".join(f"    {k} {v}\n" for k, v in opts.items())
    ssh_config.write_text(
        "# topyaz-mount test host; use as: ssh -F THIS_FILE 127.0.0.1 (or topyaz-testhost)\n"
        "Host 127.0.0.1 topyaz-testhost\n"
        "    HostName 127.0.0.1\n" + body
    )
    return sshd_config, ssh_config, client_key


def _log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start_testhost(state_dir: Path | None = None, *, install_package: bool = True,
                   log=print) -> TestHost:
    """Set up the test host (see setup()) and start its sshd; returns a TestHost."""
    require_root()
    for tool in (SSHD, "/usr/bin/ssh", "/usr/bin/ssh-keygen"):
        if not os.path.exists(tool):
            raise TestHostError(f"{tool} not found: apt-get install openssh-server openssh-client")
    setup(install_package_copy=install_package, log=log)

    remove = state_dir is None
    if state_dir is None:
        state_dir = Path(tempfile.mkdtemp(prefix="topyaz-testhost-"))
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)

    last_error = ""
    for _attempt in range(3):
        port = _free_port()
        sshd_config, ssh_config, client_key = _write_state_files(state_dir, port)
        _run([SSHD, "-t", "-f", str(sshd_config)])
        log_path = state_dir / "sshd.log"
        with open(log_path, "ab") as log_fh:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(sshd_config)],
                stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh,
                start_new_session=True,
            )
        (state_dir / "sshd.popen.pid").write_text(f"{proc.pid}\n")
        host = TestHost(state_dir=state_dir, port=port, ssh_config=ssh_config,
                        client_key=client_key, proc=proc, pid=proc.pid,
                        sshd_config=sshd_config, remove_state_dir=remove)
        if _wait_ready(host, proc):
            _write_env_sh(host)
            return host
        last_error = _log_tail(log_path)
        host._remove_state_dir = False
        host.stop()
        if "Address already in use" not in last_error:
            break
    if remove:
        shutil.rmtree(state_dir, ignore_errors=True)
    raise TestHostError(
        f"sshd on 127.0.0.1 did not accept ssh within ~10 s; log tail:\n{last_error}"
    )


def _wait_ready(host: TestHost, proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    argv = [*host.ssh_argv(), "-o", "ConnectTimeout=2", "true"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0:
            return True
        time.sleep(0.1)
    return False


def _write_env_sh(host: TestHost) -> Path:
    path = host.state_dir / "env.sh"
    path.write_text(
        "# source this file: topyaz-mount test host\n"
        f"export TM_REMOTE={shlex.quote(host.remote)}\n"
        f"export TM_SSH_CONFIG={shlex.quote(str(host.ssh_config))}\n"
        f"export TM_REMOTE_PYTHON={shlex.quote(host.remote_python)}\n"
        f"export TM_SSHD_PID={host.pid}\n"
    )
    return path


def stop_state_dir(state_dir: Path) -> bool:
    """Stop the sshd whose pid file is in state_dir. True if one was stopped."""
    state_dir = Path(state_dir).resolve()
    sshd_config = state_dir / "sshd_config"
    stopped = False
    # A foreground `testhost.py start` stops its sshd itself on SIGTERM and exits 0.
    with contextlib.suppress(OSError, ValueError, IndexError):
        runner = int((state_dir / "runner.pid").read_text().split()[0])
        if runner != os.getpid() and _is_testhost_runner(runner, state_dir):
            _kill_pid(runner, timeout=10)
            stopped = True
    seen: set[int] = set()
    for name in ("sshd.pid", "sshd.popen.pid"):
        try:
            pid = int((state_dir / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid in seen:
            continue
        seen.add(pid)
        if _pid_alive(pid) and _is_our_sshd(pid, sshd_config):
            _kill_pid(pid)
            stopped = True
    with contextlib.suppress(OSError, IndexError):
        Path((state_dir / "authorized_keys_path").read_text().split()[0]).unlink()
    return stopped


# --------------------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="set up and run sshd in the foreground")
    p_start.add_argument("--state-dir", type=Path)
    p_start.add_argument("--no-package", action="store_true",
                         help="do not copy topyaz_mount into the remote venv")
    p_stop = sub.add_parser("stop", help="stop the sshd started with --state-dir DIR")
    p_stop.add_argument("--state-dir", type=Path, required=True)
    p_setup = sub.add_parser("setup", help="user, venv, package copy, stand-ins; no sshd")
    p_setup.add_argument("--no-package", action="store_true")
    args = parser.parse_args(argv)

    def err(msg: str) -> None:
        print(f"testhost: {msg}", file=sys.stderr)

    try:
        if args.cmd == "setup":
            setup(install_package_copy=not args.no_package,
                  log=lambda m: print(m, file=sys.stderr))
            print(f"testhost: ready: {VENV_PYTHON}, {BIN_DIR}", file=sys.stderr)
            return 0
        if args.cmd == "stop":
            if stop_state_dir(args.state_dir):
                return 0
            err(f"no running sshd found for {args.state_dir}")
            return 1

        stop_requested = False

        def on_signal(signum, frame):
            nonlocal stop_requested
            stop_requested = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        host = start_testhost(args.state_dir, install_package=not args.no_package,
                              log=lambda m: print(m, file=sys.stderr))
        runner_pid_file = host.state_dir / "runner.pid"
        runner_pid_file.write_text(f"{os.getpid()}\n")
        try:
            print(f"--remote {host.remote}")
            print(f"--ssh-config {host.ssh_config}")
            print(f"--remote-python {host.remote_python}")
            print(host.pid, flush=True)
            while not stop_requested and host.alive():
                time.sleep(0.2)
            if not stop_requested:
                err("sshd exited")
                return 1
            return 0
        finally:
            host.stop()
            runner_pid_file.unlink(missing_ok=True)
    except TestHostError as exc:
        err(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
