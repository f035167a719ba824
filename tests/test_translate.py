"""translate.py: the one prefix swap from the local root to the remote mountpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topyaz_mount.client.translate import (
    DEFAULT_PRODUCTS,
    PathMap,
    TranslationError,
    expand_product,
    translate_arg,
    translate_argv,
    translate_cwd,
    translate_env,
    translate_value,
)

REMOTE = "/home/tm/.cache/topyaz-mount/sessions/abc/root"


@pytest.fixture
def tree(tmp_path):
    """A real local tree: root/ with files, and a sibling outside/ the remote cannot see."""
    root = tmp_path / "root"
    (root / "shots").mkdir(parents=True)
    (root / "shots" / "a.jpg").write_bytes(b"jpg")
    (root / "out").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.jpg").write_bytes(b"jpg")
    pm = PathMap(str(root), REMOTE)
    return pm, root, outside


def t(value, pm, cwd):
    return translate_value(value, pm, str(cwd))


# --- PathMap -------------------------------------------------------------------------


def test_pathmap_needs_absolute_roots():
    with pytest.raises(ValueError):
        PathMap("rel", "/r")
    with pytest.raises(ValueError):
        PathMap("/l", "rel")


def test_to_remote_and_back():
    pm = PathMap("/nonexistent-l/root", "/mnt/r")
    assert pm.to_remote("/nonexistent-l/root") == "/mnt/r"
    assert pm.to_remote("/nonexistent-l/root/a/b.jpg") == "/mnt/r/a/b.jpg"
    assert pm.to_remote("/nonexistent-l/root/a/../b") == "/mnt/r/b"
    assert pm.to_remote("/nonexistent-l/rootx/a") is None  # a sibling sharing the prefix
    assert pm.to_remote("/nonexistent-l") is None
    assert pm.to_local("/mnt/r/a") == "/nonexistent-l/root/a"
    assert pm.to_local("/mnt/r") == "/nonexistent-l/root"
    assert pm.to_local("/mnt/rr") is None
    assert pm.relative("/nonexistent-l/root/a/b") == "a/b"
    assert pm.relative("/nonexistent-l/root") == ""
    assert pm.relative("/elsewhere") is None


def test_roots_with_trailing_slash_and_slash_root():
    pm = PathMap("/nonexistent-l/root/", "/mnt/r/")
    assert pm.to_remote("/nonexistent-l/root/a") == "/mnt/r/a"
    assert pm.to_local("/mnt/r/a") == "/nonexistent-l/root/a"
    whole = PathMap("/", "/mnt/r")
    assert whole.to_remote("/etc/hosts") == "/mnt/r/etc/hosts"
    assert whole.to_remote("/") == "/mnt/r"


def test_to_remote_follows_a_symlink_into_the_root(tree):
    pm, root, outside = tree
    os.symlink(root / "shots", outside / "shots-link")
    assert pm.to_remote(str(outside / "shots-link" / "a.jpg")) == REMOTE + "/shots/a.jpg"


# --- values --------------------------------------------------------------------------


def test_absolute_under_root_is_swapped(tree):
    pm, root, _ = tree
    assert t(str(root / "shots" / "a.jpg"), pm, root) == REMOTE + "/shots/a.jpg"
    assert t(str(root / "out" / "new.png"), pm, root) == REMOTE + "/out/new.png"  # not yet there
    assert t(str(root / "no" / "such" / "dir"), pm, root) == REMOTE + "/no/such/dir"
    assert t(str(root), pm, root) == REMOTE


def test_trailing_slash_is_kept(tree):
    pm, root, _ = tree
    assert t(str(root / "out") + "/", pm, root) == REMOTE + "/out/"
    assert t(str(root) + "/", pm, root) == REMOTE + "/"
    assert t(str(root / "out"), pm, root) == REMOTE + "/out"


@pytest.mark.parametrize(
    "value", ["shots/a.jpg", "a.jpg", "2", "png", "out/", "./shots", "x/../shots"]
)
def test_relative_paths_stay_as_typed(tree, value):
    pm, root, _ = tree
    assert t(value, pm, root) == value
    assert t(value, pm, root / "shots") == value


def test_relative_climbing_out_of_the_root_is_refused(tree):
    pm, root, _ = tree
    for value in ("../outside/b.jpg", "..", "../outside/new.png", "shots/../../outside"):
        with pytest.raises(TranslationError):
            t(value, pm, root)
    # from a subdirectory, one level up is still inside
    assert t("../out/x.png", pm, root / "shots") == "../out/x.png"


def test_relative_climbing_to_nothing_is_left_alone(tree):
    """`../../nonexistent-zzz/q` names nothing on the client: not our business."""
    pm, root, _ = tree
    assert t("../../../../nonexistent-zzz/q", pm, root) == "../../../../nonexistent-zzz/q"


def test_outside_path_that_exists_is_an_error_naming_it(tree):
    pm, root, outside = tree
    value = str(outside / "b.jpg")
    with pytest.raises(TranslationError) as e:
        t(value, pm, root)
    assert value in str(e.value)
    assert str(root) in str(e.value)
    # a new file in an existing directory outside the root: an output the remote cannot write
    with pytest.raises(TranslationError):
        t(str(outside / "new.png"), pm, root)
    with pytest.raises(TranslationError):
        t("/etc/passwd", pm, root)


def test_dotdot_in_an_absolute_path_escaping_the_root(tree):
    pm, root, _ = tree
    for value in (str(root) + "/../outside/b.jpg", str(root) + "/shots/../../outside"):
        with pytest.raises(TranslationError):
            t(value, pm, root)
    assert t(str(root) + "/shots/../out", pm, root) == REMOTE + "/out"


def test_remote_only_paths_pass_through():
    pm = PathMap("/nonexistent-l/root", "/mnt/r")
    assert translate_value(
        "/opt/topaz/models", pm, "/nonexistent-l/root", lexists=lambda p: False
    ) == ("/opt/topaz/models")
    present = {"/opt"}
    assert (
        translate_value(
            "/opt/topaz/models", pm, "/nonexistent-l/root", lexists=present.__contains__
        )
        == "/opt/topaz/models"
    )
    # but a file in a directory that exists locally is taken as a local path
    present = {"/opt", "/opt/topaz"}
    with pytest.raises(TranslationError):
        translate_value(
            "/opt/topaz/models", pm, "/nonexistent-l/root", lexists=present.__contains__
        )


@pytest.mark.parametrize("value", ["/dev/null", "/dev/stdin", "/dev/stdout", "/dev/fd/0"])
def test_dev_paths_pass_through(tree, value):
    pm, root, _ = tree
    assert t(value, pm, root) == value


def test_empty_value():
    pm = PathMap("/nonexistent-l/root", "/mnt/r")
    assert translate_value("", pm, "/nonexistent-l/root") == ""


# --- argv ----------------------------------------------------------------------------


def test_flag_equals_path(tree):
    pm, root, outside = tree
    assert (
        translate_arg(f"--output={root}/out/x.png", pm, str(root)) == f"--output={REMOTE}/out/x.png"
    )
    assert translate_arg("--output=out/x.png", pm, str(root)) == "--output=out/x.png"
    assert translate_arg("--scale=2", pm, str(root)) == "--scale=2"
    assert translate_arg("--name=", pm, str(root)) == "--name="
    assert translate_arg(f"--dir={root}/out/", pm, str(root)) == f"--dir={REMOTE}/out/"
    with pytest.raises(TranslationError):
        translate_arg(f"--input={outside}/b.jpg", pm, str(root))
    with pytest.raises(TranslationError):
        translate_arg("--input=../outside/b.jpg", pm, str(root))


@pytest.mark.parametrize("opt", ["-o", "-v", "-vv", "--scale", "--", "-", "-2", "--overwrite"])
def test_options_untouched(tree, opt):
    pm, root, _ = tree
    assert translate_arg(opt, pm, str(root)) == opt


def test_option_named_like_an_outside_file_is_untouched(tree, monkeypatch):
    pm, root, outside = tree
    (outside / "-o").write_bytes(b"")
    monkeypatch.chdir(outside)
    assert translate_arg("-o", pm, str(outside)) == "-o"


def test_translate_argv_whole_command(tree):
    pm, root, _ = tree
    argv = [
        "tpai",
        str(root / "shots" / "a.jpg"),
        "-o",
        f"{root}/out/",
        "--scale",
        "2",
        "shots/a.jpg",
    ]
    assert translate_argv(argv, pm, str(root)) == [
        "tpai",
        REMOTE + "/shots/a.jpg",
        "-o",
        REMOTE + "/out/",
        "--scale",
        "2",
        "shots/a.jpg",
    ]


def test_literal_args_pass_untouched(tree):
    pm, root, outside = tree
    secret = str(outside / "b.jpg")
    inside = str(root / "shots" / "a.jpg")
    with pytest.raises(TranslationError):
        translate_argv(["cat", secret], pm, str(root))
    assert translate_argv(["cat", secret, inside], pm, str(root), literal=[secret, inside]) == [
        "cat",
        secret,
        inside,
    ]


def test_argv_error_names_the_bad_argument(tree):
    pm, root, outside = tree
    bad = str(outside / "b.jpg")
    with pytest.raises(TranslationError, match=bad):
        translate_argv(["tpai", str(root / "shots" / "a.jpg"), bad], pm, str(root))


# --- cwd and env ---------------------------------------------------------------------


def test_cwd(tree):
    pm, root, outside = tree
    assert translate_cwd(str(root), pm) == REMOTE
    assert translate_cwd(str(root / "shots"), pm) == REMOTE + "/shots"
    with pytest.raises(TranslationError) as e:
        translate_cwd(str(outside), pm)
    assert str(outside) in str(e.value)
    with pytest.raises(TranslationError):
        translate_cwd("/", pm)


def test_env_values_translated(tree):
    pm, root, outside = tree
    env = {
        "OUT": str(root / "out"),
        "MODELS": "/opt/nonexistent-topaz/models",
        "SCALE": "2",
        "LANG": "C.UTF-8",
        "REL": "shots/a.jpg",
        "EMPTY": "",
        "NULL": "/dev/null",
    }
    assert translate_env(env, pm, str(root)) == {
        **env,
        "OUT": REMOTE + "/out",
    }
    with pytest.raises(TranslationError):
        translate_env({"SECRET": str(outside / "b.jpg")}, pm, str(root))


# --- products ------------------------------------------------------------------------


def test_expand_product():
    assert expand_product(["photo", "x.jpg"], DEFAULT_PRODUCTS) == ["topyaz", "photo", "x.jpg"]
    assert expand_product(["giga"], DEFAULT_PRODUCTS) == ["topyaz", "giga"]
    assert expand_product(["video", "-i", "c.mp4"], DEFAULT_PRODUCTS) == [
        "topyaz",
        "video",
        "-i",
        "c.mp4",
    ]
    assert expand_product(["tpai", "photo"], DEFAULT_PRODUCTS) == ["tpai", "photo"]
    assert expand_product([], DEFAULT_PRODUCTS) == []
    custom = {"photo": ["/opt/Topaz/tpai", "--cli"]}
    assert expand_product(["photo", "a.jpg"], custom) == ["/opt/Topaz/tpai", "--cli", "a.jpg"]
    argv = ["ls"]
    out = expand_product(argv, DEFAULT_PRODUCTS)
    assert out == argv and out is not argv
    # the configured lists are not aliased into the result
    out = expand_product(["photo"], custom)
    out.append("x")
    assert custom["photo"] == ["/opt/Topaz/tpai", "--cli"]


# --- properties ----------------------------------------------------------------------

NAME = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))
ROOT = st.lists(NAME, min_size=0, max_size=3).map(lambda parts: "/" + "/".join(parts))


@settings(database=None, deadline=None, max_examples=300)
@given(ROOT, ROOT, st.lists(NAME, max_size=5))
def test_to_remote_and_to_local_are_inverse(local_root, remote_root, rel):
    pm = PathMap("/nonexistent-zz" + local_root, remote_root)
    local = pm.local_root if not rel else pm.local_root.rstrip("/") + "/" + "/".join(rel)
    remote = pm.to_remote(local)
    assert remote is not None
    assert pm.to_local(remote) == local
    assert pm.to_remote(pm.to_local(remote)) == remote
    assert pm.relative(local) == "/".join(rel)


@settings(database=None, deadline=None, max_examples=200)
@given(st.lists(NAME, max_size=4), st.booleans())
def test_translate_value_under_root_is_the_prefix_swap(rel, slash):
    pm = PathMap("/nonexistent-zz/root", "/mnt/r")
    value = "/nonexistent-zz/root" + "".join("/" + p for p in rel) + ("/" if slash else "")
    out = translate_value(value, pm, "/nonexistent-zz/root", lexists=lambda p: True)
    expected = "/mnt/r" + "".join("/" + p for p in rel) + ("/" if slash else "")
    assert out == expected


def test_cwd_relative_arguments_resolve_to_the_same_file_remotely(tree):
    """What makes leaving relative paths alone correct: cwd swaps with the same map."""
    pm, root, _ = tree
    cwd = str(root / "shots")
    rel = "../out/x.png"
    remote_cwd = translate_cwd(cwd, pm)
    assert os.path.normpath(os.path.join(remote_cwd, rel)) == pm.to_remote(
        os.path.normpath(os.path.join(cwd, rel))
    )
    assert Path(pm.to_local(remote_cwd)) == Path(cwd)
