"""harness.assets: the files the harness builds QEMU, the kernel and images from are package data
(harness/data/), found relative to the package, never to a repository; the user's recipe
folders come before the shipped ones. The same lookups from an installed wheel are
tests/boot/test_installed_package.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from harness import assets
from harness.errors import ErrorCode, NitroError
from harness.images import recipes
from helpers import REPO


def test_everything_a_build_needs_is_package_data() -> None:
    data = REPO / "harness" / "data"
    assert assets.data_dir() == data
    assert sorted(p.name for p in assets.shipped_recipes_dir().glob("*.yaml")) == [
        "hello-arm64.yaml", "hello-debian.yaml", "hello.yaml", "python-arm64.yaml",
        "python-debian.yaml", "python.yaml"]
    assert (assets.program_dir("init") / "init.c").is_file()
    assert (assets.program_dir("nsm-pcr") / "Makefile").is_file()
    assert (assets.guest_dir() / "nsm_tool.py").is_file()
    assert assets.kernel_config().read_text().startswith("#")
    assert sorted(p.name for p in assets.qemu_patches_dir().glob("*.patch")) == [
        "0001-vhost-user-device-user-creatable.patch",
        "0002-virtio-nsm-wait-for-response-buffer.patch"]
    for script in ("build-qemu.sh", "build-kernel.sh"):
        assert assets.build_script(script).read_text().startswith("#!/usr/bin/env bash")
    # pyproject ships harness/data recursively (the wheel test checks the installed copy).
    assert '"data/**/*"' in (REPO / "pyproject.toml").read_text()
    with pytest.raises(ValueError):
        assets.program_dir("../init")


def test_source_checkout_is_this_repository() -> None:
    assert assets.source_checkout() == REPO


def test_keys_do_not_depend_on_where_the_files_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The init key and the QEMU patch hash cover names and bytes only: a copy of harness/data
    elsewhere (an installed wheel) gives the same values."""
    from harness.qemu import patch_hash

    before = (recipes.program_key("init"), recipes.program_key("nsm-pcr"), patch_hash())
    copy = tmp_path / "site-packages" / "harness" / "data"
    for src in assets.data_dir().rglob("*"):
        if src.is_file() and "__pycache__" not in src.parts:
            dest = copy / src.relative_to(assets.data_dir())
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
    monkeypatch.setattr(assets, "DATA_DIR", copy)
    assert assets.program_dir("init") == copy / "programs" / "init"
    assert (recipes.program_key("init"), recipes.program_key("nsm-pcr"),
            patch_hash(assets.qemu_patches_dir())) == before
    assert hashlib.sha256(assets.kernel_config().read_bytes()).hexdigest() == hashlib.sha256(
        (REPO / "harness" / "data" / "kernel" / "nitro.config").read_bytes()).hexdigest()


def test_user_recipe_folders_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for d in (mine, theirs):
        d.mkdir()
    (mine / "hello.yaml").write_text("kernel: {package: linux-image-6.12-cloud-amd64}\n")
    (theirs / "app.yaml").write_text("kernel: {package: linux-image-6.12-cloud-amd64}\n")
    monkeypatch.setenv(assets.RECIPES_ENV, str(theirs))
    assert assets.add_recipe_dirs([mine]) == [mine, theirs]
    assert os.environ[assets.RECIPES_ENV] == f"{mine}{os.pathsep}{theirs}"
    assert assets.recipe_dirs() == [mine, theirs, assets.shipped_recipes_dir()]
    assert recipes.recipe_path("hello") == mine / "hello.yaml"  # the user's hides the shipped one
    assert recipes.recipe_path("app") == theirs / "app.yaml"
    assert recipes.recipe_path("python") == assets.shipped_recipes_dir() / "python.yaml"
    names = [r.name for r in recipes.list_recipes()]
    assert names == sorted(names) and names.count("hello") == 1 and "app" in names
    with pytest.raises(NitroError) as err:
        recipes.recipe_path("nothing-here")
    assert err.value.code == ErrorCode.EifBuildingError
    assert str(mine) in err.value.message and "known recipes: app, hello" in err.value.message
    with pytest.raises(ValueError, match="recipes folder not found"):
        assets.add_recipe_dirs([tmp_path / "absent"])
