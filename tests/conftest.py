"""Shared fixtures: the local test host (sshd + user tmremote) and sample client data.

`testhost` (session scope) starts tools/testhost.py's sshd once per test session.
Under CI (CI=true) a machine that cannot run it (not root, no /dev/fuse, no sshd)
is a test failure; elsewhere those tests are skipped with the reason.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent
TOOLS_DIR = REPO_DIR / "tools"
STANDINS_DIR = TOOLS_DIR / "standins"
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

# Under pytest-xdist each worker gets a test host of its own: worker gw0 keeps the
# user (tmremote, or TOPYAZ_MOUNT_TESTHOST_USER), gwN uses that name with "-N". Set
# before tools/testhost.py and tests/e2e_util.py read it at import.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
if _WORKER != "gw0":
    _base = os.environ.get("TOPYAZ_MOUNT_TESTHOST_USER", "tmremote")
    os.environ["TOPYAZ_MOUNT_TESTHOST_USER"] = f"{_base}-{_WORKER.removeprefix('gw')}"

# Each run (each worker) has client-side directories of its own: one worker's `mount`
# is not in the other's `status`, and the user's own profiles and caches stay out.
_CLIENT_DIRS = Path(tempfile.mkdtemp(prefix=f"topyaz-mount-tests-{_WORKER}-"))
for _var in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
    (_CLIENT_DIRS / _var.lower()).mkdir(mode=0o700)
    os.environ[_var] = str(_CLIENT_DIRS / _var.lower())

import testhost as testhost_mod  # noqa: E402  (tools/testhost.py)

import topyaz_mount  # noqa: E402
import topyaz_mount.client  # noqa: E402
from topyaz_mount.client import osapi  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_unconfigure(config):
    shutil.rmtree(_CLIENT_DIRS, ignore_errors=True)


def pytest_generate_tests(metafunc):
    """Tests marked ``both_os_calls`` run twice: with the client's native OS calls
    (Linux here) and with the portable ones macOS uses, so ``pytest`` alone runs both."""
    if metafunc.definition.get_closest_marker("both_os_calls") and sys.platform == "linux":
        metafunc.parametrize("os_calls", ["native", "portable"], indirect=True)


@pytest.fixture(autouse=True)
def os_calls(request, monkeypatch) -> str:
    """Which client OS calls a test runs with: in-process, every module's ``OS`` is
    swapped; the client subprocesses of e2e tests get TOPYAZ_MOUNT_PORTABLE=1."""
    which = getattr(request, "param", "native")
    if which == "portable":
        monkeypatch.setenv(osapi.PORTABLE_ENV, "1")
        portable = osapi.PortableCalls()
        swapped: set[str] = set()
        client_side = [
            *pkgutil.iter_modules(topyaz_mount.__path__, "topyaz_mount."),
            *pkgutil.iter_modules(topyaz_mount.client.__path__, "topyaz_mount.client."),
        ]
        for info in client_side:
            if info.ispkg or info.name.endswith(".__main__"):
                continue  # the agent (its own OS) and the command line's entry point
            module = importlib.import_module(info.name)  # a later import would miss the swap
            if getattr(module, "OS", None) is osapi.OS:
                monkeypatch.setattr(module, "OS", portable)
                swapped.add(info.name)
        # A layout change must not quietly leave the portable run on native calls.
        assert {"topyaz_mount.client.fileserver", "topyaz_mount.client.jail"} <= swapped
    return which


def _unavailable(reason: str):
    """Fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"test host unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"test host unavailable: {reason}")


def _testhost_blocker() -> str | None:
    if os.geteuid() != 0:
        return "tests with the test host must run as root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel/container)"
    if not os.path.exists(testhost_mod.SSHD):
        return f"{testhost_mod.SSHD} is missing (apt-get install openssh-server)"
    if not shutil.which("ssh"):
        return "ssh client is missing (apt-get install openssh-client)"
    return None


@pytest.fixture(scope="session")
def testhost():
    """A running test host: sshd on 127.0.0.1 for user tmremote (see tools/testhost.py)."""
    reason = _testhost_blocker()
    if reason:
        _unavailable(reason)
    try:
        host = testhost_mod.start_testhost(log=lambda msg: print(msg, file=sys.stderr))
    except testhost_mod.TestHostError as exc:
        _unavailable(str(exc))
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory) -> Path:
    """Sample inputs from tools/make_samples.py, made once per session (do not modify)."""
    from make_samples import make_samples

    directory = tmp_path_factory.mktemp("samples")
    make_samples(directory)
    return directory


def _other_users_can_reach(path: Path) -> bool:
    """True if a user other than path's owner could traverse to path and read it."""
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == 0 and not (st.st_mode & stat.S_IXOTH) and p != Path("/"):
            return False
    return True


@pytest.fixture
def client_root(tmp_path, samples_dir) -> Path:
    """A fresh local directory holding the samples that tmremote cannot read directly.

    (It is below pytest's /tmp/pytest-of-root, which is 0700; the directory itself is
    made 0700 too, so this holds wherever tmp_path lives.)
    """
    root = tmp_path / "client"
    shutil.copytree(samples_dir, root)
    os.chmod(root, 0o700)
    assert not _other_users_can_reach(root), f"{root} is reachable by other users"
    return root
