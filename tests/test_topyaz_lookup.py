"""Where topyaz_mount.topyaz finds a product's CLI: the host probe, run here with sh.

The probe is the one remote shell script the executor runs per session; these tests run
it locally against fake PATH and home directories and check what it picks.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("topyaz.execution.base", reason="topyaz is not installed (see .ci/run)")

from topyaz_mount import topyaz as tm  # noqa: E402 (after the skip)


def tool(path: Path, body: str = "exit 0") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def probe(tmp_path: Path, profile: dict[str, str] | None = None) -> tm.HostFacts:
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
           "TVAI_MODEL_DIR": "/srv/models"}
    r = subprocess.run(["sh", "-c", tm._probe_script(profile or {})], env=env,
                       capture_output=True, text=True, check=True)
    return tm.HostFacts.parse(r.stdout)


def test_path_then_install_locations_and_only_topaz_ffmpeg(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    tool(bin_dir / "tpai")
    tool(bin_dir / "ffmpeg", "echo ' ... scale   V->V'")  # an ordinary ffmpeg
    tvai = tool(bin_dir / "tvai-ffmpeg", "echo ' ... tvai_up   V->V'")
    installed = tool(tmp_path / "home" / "opt" / "gigapixel")
    monkeypatch.setitem(tm.INSTALLS, "giga", tm.Install(
        ("gigapixel",), {os.uname().sysname: ("/nonexistent/gigapixel", "~/opt/gigapixel")}))
    facts = probe(tmp_path)
    assert facts.os == os.uname().sysname and facts.home == str(tmp_path / "home")
    assert facts.env == {"TVAI_MODEL_DIR": "/srv/models"}
    assert facts.programs == {"photo": str(bin_dir / "tpai"), "giga": str(installed),
                              "video": str(tvai)}


def test_profile_command_first_and_nothing_found_is_absent(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    tool(bin_dir / "tpai")
    mine = tool(tmp_path / "elsewhere" / "my tpai")  # a space in the path
    for key in ("giga", "video"):  # this machine's own install locations are not tested
        monkeypatch.setitem(tm.INSTALLS, key, tm.Install(
            tm.INSTALLS[key].names, {}, tm.INSTALLS[key].tvai))
    facts = probe(tmp_path, {"photo": str(mine), "giga": "no-such-gigapixel"})
    # /usr/bin/ffmpeg, if there, lacks tvai_up: not Topaz's, so not taken.
    assert facts.programs == {"photo": str(mine)}


def test_host_facts_parse_ignores_what_is_not_a_path():
    facts = tm.HostFacts.parse("os=Linux\nhome=/h\nphoto=\ngiga=relative\nvideo=/v\n"
                               "env.TVAI_X=/x\nnoise\n")
    assert (facts.os, facts.home, facts.env, facts.programs) == (
        "Linux", "/h", {"TVAI_X": "/x"}, {"video": "/v"})
    assert facts.guesses() == {"TVAI_MODEL_DIR": "/opt/video-ai/models",
                               "TVAI_MODEL_DATA_DIR": "/h/._config/topaz-video-ai/models"}
