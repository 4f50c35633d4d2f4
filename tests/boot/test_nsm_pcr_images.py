"""nsm-pcr (harness/data/programs/nsm-pcr) in the built hello images: the images carry the static tool and
their application runs it before its greeting. The tool itself is tests/unit/test_nsm_pcr.py;
tests/boot/test_qemu_cross_check.py boots hello and reads its lines on QEMU's NSM."""

from __future__ import annotations

import stat

import pytest

from harness.cpio import read_cpio
from harness.eif import read_eif
from harness.images import recipes


@pytest.mark.parametrize("recipe", ["hello", "hello-debian"])
def test_hello_images_carry_nsm_pcr(recipe):
    built = recipes.build(recipe)
    assert recipes.load_recipe(recipe).rootfs["programs"] == {"/usr/bin/nsm-pcr": "nsm-pcr"}
    eif = read_eif(built.path)
    ramdisk = eif.ramdisks[1]
    with open(eif.path, "rb") as f:
        f.seek(ramdisk.data_offset)
        cust = {r.name: r for r in read_cpio(f.read(ramdisk.size))}
    tool = cust["rootfs/usr/bin/nsm-pcr"]
    assert tool.mode == stat.S_IFREG | 0o755
    assert (tool.uid, tool.gid, tool.mtime) == (0, 0, recipes.FIXED_MTIME)
    assert tool.data == recipes.build_static_program("nsm-pcr").read_bytes()
    # The application prints PCR0-2 once, never failing on it, before its greeting loop.
    script = cust["rootfs/usr/bin/hello"].data.decode()
    assert "\nnsm-pcr 0 1 2 || true\n" in script
    assert script.index("nsm-pcr 0 1 2") < script.index("while true")
