"""Image recipes without building an image: the shipped recipes validate, every recipe error
names its file and field, an unknown recipe or package fails before anything is fetched
(apt-cache only), and Debian dependency fields parse. Builds are tests/boot/test_images.py."""

from __future__ import annotations

import pytest

from harness.errors import ErrorCode, NitroError
from harness.images import debian, recipes
from helpers.boot_images import AWS_CMDLINE


def test_shipped_recipes_validate():
    names = {r.name for r in recipes.list_recipes()}
    assert {"hello", "python"} <= names
    py = recipes.load_recipe("python")
    assert py.raw["cmd"] == ["/bin/sh"]
    assert "aws-nsm-interface==1.0.0" in py.rootfs["pip"]
    assert py.kernel["cmdline"] == AWS_CMDLINE


@pytest.mark.parametrize("body, field", [
    ("kernel: {package: linux-image-6.12-cloud-amd64}\nbogus: 1\n", "(top level)"),
    ("kernel: {package: linux-image-6.12-cloud-amd64}\nrootfs: {files: [{path: rel}]}\n",
     "rootfs.files.0.path"),
    ("kernel: {package: linux-image-6.12-cloud-amd64}\nenv: [NOEQUALS]\n", "env.0"),
    ("rootfs: {debs: [busybox-static]}\n", "kernel"),
    ("kernel: {package: linux-image-6.12-cloud-amd64}\n"
     "application: {docker_archive: a.tar, directory: d}\n", "application"),
])
def test_recipe_errors_name_file_and_field(tmp_path, body, field):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(NitroError) as e:
        recipes.load_recipe(p)
    assert e.value.code == ErrorCode.EifBuildingError
    assert str(p) in e.value.message and field in e.value.message


def test_unknown_recipe_and_package(tmp_path):
    with pytest.raises(NitroError) as e:
        recipes.recipe_path("no-such-recipe")
    assert "hello" in e.value.message  # lists the known recipes
    p = tmp_path / "nopkg.yaml"
    p.write_text("kernel: {package: linux-image-6.12-cloud-amd64}\n"
                 "rootfs: {debs: [no-such-package-nitro-harness]}\n")
    with pytest.raises(NitroError) as e:
        recipes.build(p)
    assert "no-such-package-nitro-harness" in e.value.message and "rootfs.debs" in e.value.message


def test_parse_relations():
    assert debian.parse_relations(
        "libc6 (>= 2.34), media-types | mime-support, python3:any, foo [amd64]") == [
        ["libc6"], ["media-types", "mime-support"], ["python3"], ["foo"]]
    assert debian.parse_relations("") == []
