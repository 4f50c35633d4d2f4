"""The boot files cache (docs/boot.md#boot-files): extracted once per EIF content, reused after,
named by content (not by path), bounded, and never in the way of a boot."""

from __future__ import annotations

import os
import time

import pytest

from harness import eif as eif_mod
from harness.eif import boot_cache
from harness.errors import NitroError
from helpers.eif_files import CMDLINE, KERNEL, RAMDISK, assemble


def write(path, sections, **kw):
    data, _ = assemble(sections, **kw)
    path.write_bytes(data)
    return path


SECTIONS = [(KERNEL, b"K" * 4096), (CMDLINE, b"console=ttyS0 reboot=k"), (RAMDISK, b"boot ramdisk"),
            (RAMDISK, b"app ramdisk")]


def boot(path, cache, state):
    measurements, _ = eif_mod.measure_and_check(path)
    return boot_cache.cached_boot_files(path, measurements, cache, state)


def test_extracted_once_then_reused_by_content(tmp_path, monkeypatch):
    cache, state = tmp_path / "cache", tmp_path / "state"
    first = boot(write(tmp_path / "a.eif", SECTIONS), cache, state)
    assert first.kernel.read_bytes() == b"K" * 4096
    assert first.initrd.read_bytes() == b"boot ramdiskapp ramdisk"
    assert first.cmdline == "console=ttyS0 reboot=k"
    assert first.kernel.parent.parent == cache and not state.exists()
    # A copy under another name is the same content: found in the cache, nothing extracted.
    def no_extraction(*args):
        raise AssertionError("extracted again")

    monkeypatch.setattr(boot_cache, "extract_boot_files", no_extraction)
    again = boot(write(tmp_path / "copy.eif", SECTIONS), cache, state)
    assert (again.kernel, again.initrd, again.cmdline) == (first.kernel, first.initrd, first.cmdline)
    assert again.measurements == first.measurements
    assert [p.name for p in cache.iterdir()] == [first.kernel.parent.name]


def test_moving_bytes_between_sections_is_other_content(tmp_path):
    # The PCRs hash the kernel, command line and first ramdisk end to end: moving the kernel's
    # last byte into the command line keeps every PCR, yet the files QEMU boots differ.
    cache, state = tmp_path / "cache", tmp_path / "state"
    a = boot(write(tmp_path / "a.eif", SECTIONS), cache, state)
    shifted = [(KERNEL, b"K" * 4095), (CMDLINE, b"Kconsole=ttyS0 reboot=k")] + SECTIONS[2:]
    b = boot(write(tmp_path / "b.eif", shifted), cache, state)
    assert a.measurements == b.measurements
    assert a.kernel != b.kernel
    assert (len(b.kernel.read_bytes()), b.cmdline) == (4095, "Kconsole=ttyS0 reboot=k")


def test_the_architecture_comes_from_the_flags_cached_or_not(tmp_path):
    cache, state = tmp_path / "cache", tmp_path / "state"
    assert boot(write(tmp_path / "a.eif", SECTIONS), cache, state).arch.name == "x86_64"
    arm = write(tmp_path / "arm.eif", SECTIONS, flags=1)
    # The same sections: the same cache entry (the key is the content), but the architecture
    # is read from each EIF's own header, on the first read and on the cached one.
    assert boot(arm, cache, state).arch.name == "aarch64"
    assert boot(arm, cache, state).arch.name == "aarch64"


def test_without_a_writable_cache_the_files_go_to_the_state_folder(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    got = boot(write(tmp_path / "a.eif", SECTIONS), blocked / "cache", tmp_path / "state")
    assert got.kernel == tmp_path / "state" / "kernel" and got.kernel.read_bytes() == b"K" * 4096


def test_old_entries_beyond_the_kept_ones_are_removed_recent_ones_never(tmp_path):
    cache, state = tmp_path / "cache", tmp_path / "state"
    old = time.time() - boot_cache.IDLE_S - 60
    made = []
    for i in range(boot_cache.KEEP + 3):
        sections = [(KERNEL, b"K%d" % i)] + SECTIONS[1:]
        made.append(boot(write(tmp_path / f"{i}.eif", sections), cache, state).kernel.parent)
        os.utime(made[-1], (old + i, old + i))  # used long ago, the first ones longest
    dead = cache / ".tmp-crashed"
    dead.mkdir()
    os.utime(dead, (old, old))
    newest = boot(write(tmp_path / "new.eif", [(KERNEL, b"new")] + SECTIONS[1:]), cache, state)
    left = set(cache.iterdir())
    # The newest entry and the KEEP most recently used others stay; the rest and the dead
    # temporary folder are gone.
    assert left == {newest.kernel.parent, *made[-(boot_cache.KEEP - 1):]}
    # Entries used recently are kept however many there are.
    for path in made[-(boot_cache.KEEP - 1):]:
        os.utime(path)
    for i in range(3):
        boot(write(tmp_path / f"r{i}.eif", [(KERNEL, b"R%d" % i)] + SECTIONS[1:]), cache, state)
    assert len(list(cache.iterdir())) == boot_cache.KEEP + 3


def test_the_kernel_is_read_once_per_content_in_a_process(tmp_path, monkeypatch):
    from harness import enclave_boot

    reads = []
    real = enclave_boot.read_kernel_image
    monkeypatch.setattr(enclave_boot, "read_kernel_image", lambda image: reads.append(image) or real(image))
    monkeypatch.setattr(enclave_boot, "_KERNELS", type(enclave_boot._KERNELS)())
    paths = []
    for n in range(6):
        path = tmp_path / f"k{n}"
        path.write_bytes(b"\x7fELF" + bytes([n]) * 60)
        paths.append(path)
    first = enclave_boot.boot_kernel(paths[0])
    (tmp_path / "same").write_bytes(paths[0].read_bytes())
    assert enclave_boot.boot_kernel(tmp_path / "same") is first  # same bytes, another file
    assert len(reads) == 1
    for path in paths[1:]:
        enclave_boot.boot_kernel(path)
    assert len(reads) == 6 and len(enclave_boot._KERNELS) == 4  # the 4 most recent kept
    assert enclave_boot.boot_kernel(paths[0]) is not first and len(reads) == 7


def test_an_eif_that_cannot_boot_is_refused_even_when_cached(tmp_path):
    cache, state = tmp_path / "cache", tmp_path / "state"
    boot(write(tmp_path / "a.eif", SECTIONS), cache, state)
    old = write(tmp_path / "v3.eif", SECTIONS, version=3)
    with pytest.raises(NitroError, match="version: 3 < 4"):
        boot(old, cache, state)
