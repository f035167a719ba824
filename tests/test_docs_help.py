"""The docs and `--help` cannot drift apart: every option of every command is documented
on its command's page, and every option an options table names exists."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from topyaz_mount.cli import main

REPO = Path(__file__).resolve().parent.parent
# Where each command's options are documented (the README documents the rest).
PAGES = {
    "exec": ["docs/exec.md"],
    "mount": ["docs/mount.md"],
    "unmount": ["docs/mount.md"],
    "status": ["docs/mount.md"],
    "shell": ["docs/mount.md"],
}
TABLED = ["README.md", "docs/exec.md", "docs/mount.md"]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def _options(command: click.Command) -> set[str]:
    return {
        name
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden
        for name in (*param.opts, *param.secondary_opts)
        if name.startswith("--")
    }


def _text(pages: list[str]) -> str:
    return "\n".join((REPO / page).read_text() for page in pages)


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_of_a_command_is_on_its_page(name):
    page = _text(PAGES.get(name, ["README.md"]))
    assert f"topyaz-mount {name}" in page or f"`{name} " in page
    missing = sorted(o for o in _options(main.commands[name]) if not re.search(
        rf"(?<![\w-]){re.escape(o)}(?![\w-])", page))
    assert not missing, f"{name}: not in {PAGES.get(name, ['README.md'])}: {missing}"


def test_every_option_an_options_table_names_exists():
    known = {o for command in main.commands.values() for o in _options(command)}
    known |= {"--help", "--version"}
    rows = [line for line in _text(TABLED).splitlines() if line.startswith("| `")]
    named = {o for row in rows for o in OPTION.findall(row.split(" | ")[0])}
    assert named, "no option tables found"
    assert not sorted(named - known)


@pytest.mark.parametrize("name", [None, *sorted(main.commands)])
def test_help_runs_and_names_each_option(name):
    args = ["--help"] if name is None else [name, "--help"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    if name is not None:
        for option in _options(main.commands[name]):
            assert option in r.output
