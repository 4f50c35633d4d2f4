"""EIFs for boot tests: the shipped recipes, and deliberately broken images built from hello's
kernel (the same kernel, command line and init path; only the ramdisk differs)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from harness import cpio, eif
from harness.images.recipes import build_image

#: The kernel command line of AWS's blobs, which the shipped recipes use
#: (docs/boot.md#kernel-command-line).
AWS_CMDLINE = ("reboot=k panic=30 pci=off nomodules console=ttyS0 i8042.noaux i8042.nomux "
               "i8042.nopnp i8042.dumbkbd random.trust_cpu=on")


def recipe_eif(name: str) -> Path:
    """The cached EIF of the shipped recipe ``<name>`` (built on first use)."""
    return build_image(name)


def _kernel_and_cmdline(work: Path) -> tuple[Path, str]:
    boot = eif.extract_boot_files(recipe_eif("hello"), work)
    return boot.kernel, boot.cmdline


def panicking_eif(out: Path) -> Path:
    """An EIF whose ramdisk has no /init: the kernel cannot start userspace and panics."""
    with tempfile.TemporaryDirectory() as tmp:
        kernel, cmdline = _kernel_and_cmdline(Path(tmp))
        ramdisk = Path(tmp) / "ramdisk"
        cpio.write_cpio_file(ramdisk, [cpio.Entry.directory("dev")])
        eif.write_eif(out, kernel, cmdline, [ramdisk], None)
    return out


def silent_init_eif(out: Path) -> Path:
    """An EIF whose /init runs but never sends the heartbeat (it sleeps forever)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        kernel, cmdline = _kernel_and_cmdline(work)
        source = work / "init.c"
        source.write_text(
            '#include <unistd.h>\n#include <stdio.h>\n'
            'int main(void) { puts("silent-init: not sending the heartbeat"); for (;;) pause(); }\n'
        )
        binary = work / "init"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], check=True)
        ramdisk = work / "ramdisk"
        cpio.write_cpio_file(
            ramdisk,
            [cpio.Entry.directory("dev"), cpio.Entry.file("init", binary.read_bytes(), mode=0o755)],
        )
        eif.write_eif(out, kernel, cmdline, [ramdisk], None)
    return out
