"""The real topyaz (pinned source, commit 66b3c5b) drives topyaz-mount.

topyaz's products run in this process with ``topyaz_mount.topyaz.MountExecutor`` as
their executor, and its command line runs through ``topyaz-mount topyaz``; the test host
has only the stand-in Topaz CLIs (no topyaz). Each output's bytes are checked against
the same topyaz product run locally with topyaz's own LocalExecutor and the stand-ins.

topyaz is installed from ``../shared/third_party/topyaz`` (beside the clone; see
.ci/run). Without it these tests skip, saying so; under CI they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from e2e_util import CLI, REMOTE_USER, client_env

REPO_DIR = Path(__file__).resolve().parent.parent
STANDINS_DIR = REPO_DIR / "tools" / "standins"
TOPYAZ_SRC = REPO_DIR.parent / "shared" / "third_party" / "topyaz"

try:
    import topyaz  # noqa: F401
except ImportError:
    reason = (
        f"topyaz is not installed: SETUPTOOLS_SCM_PRETEND_VERSION=1.0.0 pip install {TOPYAZ_SRC}"
        if TOPYAZ_SRC.is_dir()
        else f"topyaz's pinned source is absent ({TOPYAZ_SRC})"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)

from topyaz.core.errors import ProcessingError  # noqa: E402 (after the skip)
from topyaz.core.types import ProcessingOptions, RemoteOptions  # noqa: E402 (after the skip)
from topyaz.execution.base import CommandExecutor, ExecutorContext  # noqa: E402 (after the skip)
from topyaz.execution.local import LocalExecutor  # noqa: E402 (after the skip)
from topyaz.products import GigapixelAI, PhotoAI, VideoAI  # noqa: E402 (after the skip)

from topyaz_mount.topyaz import MIRROR_PREFIX, MountExecutor  # noqa: E402 (after the skip)

pytestmark = pytest.mark.e2e

# product class, its stand-in, the input, and the name topyaz gives the output
CASES = {
    "photo": (PhotoAI, "tpai", "noise.jpg", "noise__photo_ai.jpg"),
    "giga": (GigapixelAI, "gigapixel", "gradient.png", "gradient_iGigapixelAI.png"),
    "video": (VideoAI, "tvai-ffmpeg", "clip.mp4", "clip_iVideoAI.mp4"),
}


@pytest.fixture(autouse=True)
def topyaz_environment(monkeypatch):
    """VideoAI writes TVAI_* into os.environ: restore it after each test."""
    for name in ("TVAI_MODEL_DIR", "TVAI_MODEL_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def profile(testhost, tmp_path, monkeypatch) -> Path:
    """A host profile for the test host, as `setup` would write it: its ssh config and
    remote Python let topyaz's own RemoteOptions (host, user, port) reach it."""
    config = tmp_path / "config.toml"
    key = f"{REMOTE_USER}@127.0.0.1:{testhost.port}"
    config.write_text(
        f'[hosts."{key}"]\n'
        f'remote_python = "{testhost.remote_python}"\n'
        f'ssh_config = "{testhost.ssh_config}"\n'
    )
    monkeypatch.setenv("TOPYAZ_MOUNT_CONFIG", str(config))
    return config


@pytest.fixture
def executor(testhost, profile, client_root):
    """topyaz's own RemoteOptions and ExecutorContext, as a topyaz user writes them."""
    ex = MountExecutor(
        RemoteOptions(host="127.0.0.1", user=REMOTE_USER, ssh_port=testhost.port),
        ExecutorContext(working_dir=str(client_root)),
    )
    yield ex
    ex.close()


@pytest.fixture
def local_copy(tmp_path, client_root) -> Path:
    local = tmp_path / "local"
    shutil.copytree(client_root, local)
    return local


def local_product_run(product: str, local: Path, **kwargs) -> bytes:
    """The same topyaz product, run here with LocalExecutor and the stand-in CLI."""
    cls, standin, src, produced = CASES[product]
    p = cls(LocalExecutor(ExecutorContext()), ProcessingOptions())
    p._executable_path = STANDINS_DIR / standin
    result = p.process(local / src, **kwargs)
    assert result.success, result.error_message
    return (local / produced).read_bytes()


def leftovers(root: Path) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith(MIRROR_PREFIX)]


@pytest.mark.parametrize("product", sorted(CASES))
def test_product_process_runs_through_the_executor(executor, client_root, local_copy,
                                                   product):
    cls, _, src, produced = CASES[product]
    assert isinstance(executor, CommandExecutor)
    result = cls(executor, ProcessingOptions()).process(client_root / src)
    assert result.success, f"{result.error_message}\n{result.stderr}"
    assert result.output_path == client_root / produced
    got = (client_root / produced).read_bytes()
    assert got == local_product_run(product, local_copy)
    assert len(got) > 1000
    assert leftovers(client_root) == []
    # The CLI was found on the host (once per session), not on this machine.
    found = executor.host_facts().programs[product]
    assert result.command[0] == found
    assert found.startswith("/opt/topyaz-mount-testhost")


def test_product_output_to_a_chosen_path(executor, client_root, local_copy):
    out = client_root / "out" / "big.png"
    result = GigapixelAI(executor, ProcessingOptions()).process(
        client_root / "gradient.png", out, scale=3
    )
    assert result.success, result.error_message
    local = GigapixelAI(LocalExecutor(ExecutorContext()), ProcessingOptions())
    local._executable_path = STANDINS_DIR / "gigapixel"
    assert local.process(local_copy / "gradient.png", local_copy / "big.png", scale=3).success
    assert out.read_bytes() == (local_copy / "big.png").read_bytes()
    assert leftovers(client_root) == []


def test_topyaz_semantics_environment_timeouts_errors_info(executor, client_root,
                                                         monkeypatch):
    ex = executor
    info = ex.get_info()
    assert list(info)[:2] == ["type", "available"]
    assert info["type"] == "MountExecutor" and info["available"] == "True"
    assert info["host"] == "127.0.0.1" and "mountpoint" in info

    # The context's environment delta and TVAI_* travel; paths under the root are
    # translated; topyaz's guess for this machine becomes the host's.
    VideoAI(ex, ProcessingOptions())  # sets TVAI_MODEL_DIR for *this* machine
    ex.context.add_env_var("JOB_INPUT", str(client_root / "noise.jpg"))
    monkeypatch.setenv("TVAI_EXTRA", str(client_root / "models"))
    code, out, err = ex.execute(
        ["sh", "-c", 'echo "$JOB_INPUT|$TVAI_MODEL_DIR|$TVAI_EXTRA|${HOME_OF_CLIENT-unset}"']
    )
    assert code == 0, err
    mount = info["mountpoint"]
    assert out == f"{mount}/noise.jpg|/opt/video-ai/models|{mount}/models|unset\n"

    # timeout=0 means the context's timeout, as in topyaz.
    ex.context.timeout = 1
    with pytest.raises(ProcessingError, match="timed out after 1 seconds"):
        ex.execute(["sleep", "30"], timeout=0)
    ex.context.timeout = 3600
    with pytest.raises(ProcessingError, match="Command not found: no-such-command-xyz"):
        ex.execute(["no-such-command-xyz"])
    assert ex.execute(["sh", "-c", "exit 3"]) == (3, "", "")


def test_dry_run_does_not_connect(profile, client_root):
    ex = MountExecutor(RemoteOptions(host="127.0.0.1", user=REMOTE_USER, ssh_port=1),
                       ExecutorContext(working_dir=str(client_root), dry_run=True))
    result = PhotoAI(ex, ProcessingOptions(dry_run=True)).process(client_root / "noise.jpg")
    assert result.success and result.command[0] == "tpai"
    assert ex.execute(["tpai"]) == (0, "dry-run-output", "")
    assert not (client_root / "noise__photo_ai.jpg").exists()


def dropin(testhost, root: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [*CLI, "topyaz", "--remote", f"{REMOTE_USER}@127.0.0.1:{testhost.port}",
            "-F", str(testhost.ssh_config), "--remote-python", testhost.remote_python,
            "--root", str(root), *args]
    return subprocess.run(argv, cwd=root, env=client_env(), capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=300)


@pytest.mark.parametrize("product", sorted(CASES))
def test_dropin_cli_runs_each_product(testhost, client_root, local_copy, product):
    _, _, src, produced = CASES[product]
    r = dropin(testhost, client_root, product, src)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    assert r.stdout == b"True\n", r.stderr.decode(errors="replace")[-3000:]
    assert (client_root / produced).read_bytes() == local_product_run(product, local_copy)
    assert leftovers(client_root) == []


def test_dropin_cli_passes_arguments_and_status_through(testhost, client_root):
    # An option of topyaz's reaches its product: --scale 3 makes a 3x image.
    r = dropin(testhost, client_root, "giga", "gradient.png", "--scale", "3",
               "--output", "out/g3.png")
    assert r.returncode == 0 and r.stdout == b"True\n", r.stderr.decode(errors="replace")
    from PIL import Image

    with Image.open(client_root / "gradient.png") as a, Image.open(client_root / "out/g3.png") as b:
        assert b.size == (a.width * 3, a.height * 3)
    # topyaz's own failure (a missing input) and bad usage keep topyaz's output and status.
    for args in (["photo", "missing.jpg"], ["no-such-command"]):
        mine = dropin(testhost, client_root, *args)
        theirs = subprocess.run([sys.executable, "-m", "topyaz", *args], cwd=client_root,
                                capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout), args


def test_profile_command_comes_first_and_a_topyaz_wrapper_is_skipped(executor, profile,
                                                                     testhost):
    bin_dir = Path(testhost.remote_python).parent.parent.parent / "bin"
    with profile.open("a") as fh:
        fh.write(f'photo_cmd = "topyaz photo"\ngiga_cmd = "{bin_dir}/tpai --cli"\n')
    programs = executor.host_facts().programs
    assert programs["photo"] == f"{bin_dir}/tpai"  # from the PATH: the wrapper is no CLI
    assert programs["giga"] == f"{bin_dir}/tpai"  # the profile's program
    assert programs["video"] == f"{bin_dir}/tvai-ffmpeg"  # not /usr/bin/ffmpeg: no tvai_up


def test_importing_topyaz_mount_does_not_import_topyaz():
    code = ("import sys, topyaz_mount; topyaz_mount.MountExecutor; topyaz_mount.RemoteMount; "
            "print('topyaz' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=client_env(), capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "False\n"), r.stderr


def test_calls_back_to_back_in_one_session(executor, client_root, local_copy):
    # Each call gets a temporary directory of its own in the root, emptied into topyaz's.
    giga = GigapixelAI(executor, ProcessingOptions())
    for src in ("gradient.png", "noise.jpg", "gradient.png"):
        result = giga.process(client_root / src, client_root / "out" / src)
        assert result.success, f"{result.error_message}\n{result.stderr}"
    local = GigapixelAI(LocalExecutor(ExecutorContext()), ProcessingOptions())
    local._executable_path = STANDINS_DIR / "gigapixel"
    for src in ("gradient.png", "noise.jpg"):
        assert local.process(local_copy / src, local_copy / "out" / src).success
        assert (client_root / "out" / src).read_bytes() == (local_copy / "out" / src).read_bytes()
    assert leftovers(client_root) == []


def test_topyaz_temp_dir_is_in_the_root_for_the_call(executor, client_root):
    assert executor.execute(["ls"])[0] == 0  # the host has listed the root just now
    with tempfile.TemporaryDirectory(prefix="topyaz_test_") as tmp:
        # A CLI that does not create its output directory must find it there at once.
        code, _, err = executor.execute(
            ["sh", "-c", 'test -d "$1" && echo made > "$1/out.txt"', "sh", tmp])
        assert code == 0, err
        assert (Path(tmp) / "out.txt").read_text() == "made\n"
    assert leftovers(client_root) == []


def test_a_cli_the_host_lacks_is_topyaz_executable_not_found(executor, client_root,
                                                             monkeypatch):
    from topyaz.core.errors import ExecutableNotFoundError

    import topyaz_mount.topyaz as tm

    monkeypatch.setitem(tm.INSTALLS, "photo", tm.Install(("no-such-tpai",), {}))
    with pytest.raises(ExecutableNotFoundError, match="Topaz Photo AI executable not found"):
        PhotoAI(executor, ProcessingOptions()).process(client_root / "noise.jpg")
    assert not (client_root / "noise__photo_ai.jpg").exists()
