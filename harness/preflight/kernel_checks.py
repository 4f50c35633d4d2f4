"""Preflight checks of the kernel: format and architecture, command-line device support
(docs/boot.md#machine-layout), and the NSM module's version magic.

A module loads only when its ``vermagic`` equals the kernel's (kernel/module/version.c; with
modversions on both sides the release part is skipped and symbol CRCs decide instead); init
loads ``/nsm.ko`` before the heartbeat, and AWS's init dies when that fails.
"""

from __future__ import annotations

from harness.arch import X86_64, Arch
from harness.bzimage import KernelImage
from harness.layout import cmdline_devices
from harness.preflight.elf import elf_facts, module_vermagic
from harness.preflight.findings import Finding, error, warning
from harness.preflight.initramfs import Initramfs

__all__ = ["kernel_findings", "nsm_findings"]

_NITRO_KERNEL = ("boot a kernel built with CONFIG_VIRTIO_MMIO=y and "
                 "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y, as AWS's blobs are (or the harness's: "
                 "`nitro-harness blobs export DIR`)")


def kernel_findings(kernel: KernelImage, arch: Arch = X86_64) -> list[Finding]:
    """Format (a bzImage), architecture (x86_64) and command-line devices of an x86_64 EIF's
    kernel; an arm64 ``Image`` for an aarch64 EIF (its devices come from the device tree:
    docs/boot.md#aarch64-machine). A kernel of the other architecture is
    :func:`harness.preflight.eif_checks.arch_findings`'s finding, not repeated here."""
    if arch != X86_64:
        if kernel.format in ("Image", "ELF") and kernel.arch == arch.name:
            return []
        if kernel.arch == "x86_64":
            return []  # the flag and the kernel disagree: reported once, as eif-arch
        return [error("kernel-format", f"kernel section: {kernel.format}: an {arch.name} "
                      "enclave boots an arm64 Image (magic 'ARM\\x64' at 0x38)",
                      "use arch/arm64/boot/Image of the kernel build")]
    if kernel.format == "Image":
        return []  # an aarch64 kernel in an x86_64 EIF: reported once, as eif-arch
    if kernel.format != "bzImage":
        what = {"Image": "an arm64 Image", "ELF": "a bare ELF vmlinux"}.get(kernel.format,
                                                                           "not a kernel image")
        return [error("kernel-format", f"kernel section: {what}: an x86_64 enclave boots a "
                      "bzImage (setup header 'HdrS' at 0x202)",
                      "use arch/x86/boot/bzImage of the kernel build")]
    out = []
    if kernel.arch != "x86_64":
        out.append(error("kernel-arch", f"kernel section: a {kernel.arch} bzImage (no 64-bit "
                         "entry point, xloadflags bit 0): Nitro boots 64-bit kernels",
                         "build the kernel for x86_64"))
    devices = cmdline_devices(kernel)
    if devices.supported is False:
        out.append(error("kernel-cmdline-devices", "this EIF would not boot on Nitro: its "
                         f"kernel cannot take virtio_mmio.device= entries ({devices.evidence}); "
                         "the harness boots it in the ACPI layout instead", _NITRO_KERNEL))
    elif devices.supported is None:
        out.append(warning("kernel-cmdline-devices", f"cannot tell whether the kernel takes "
                           f"virtio_mmio.device= entries ({devices.evidence}); the harness "
                           "assumes it does (Nitro layout)", "install the decompressor named"))
    return out


def nsm_findings(kernel: KernelImage, ramfs: Initramfs) -> list[Finding]:
    """``/nsm.ko`` present, an ELF module, built for this kernel (version magic)."""
    node = ramfs.get("nsm.ko")
    if node is None:
        return [warning("nsm-module", "the bootstrap ramdisk has no /nsm.ko: /dev/nsm exists only "
                        "if the kernel has the NSM driver built in",
                        "add the nsm.ko built with this kernel (nitro-cli's blobs carry one)")]
    if not node.is_file:
        return [error("nsm-module", "/nsm.ko is not a regular file", "ship the module itself")]
    data = ramfs.read(node, 16 << 20)
    facts = elf_facts(ramfs.read_at(node))
    magic = module_vermagic(data)
    if facts is None or magic is None:
        return [error("nsm-module", "/nsm.ko is not a kernel module (no ELF header or no "
                      "vermagic= in .modinfo): init cannot load it and stops before the heartbeat",
                      "use the nsm.ko built with this kernel")]
    kernel_magic = kernel.vermagic()
    fix = "use the nsm.ko built with this kernel (the same blobs directory)"
    if kernel_magic is not None:
        if magic == kernel_magic:
            return []
        if "modversions" in magic and "modversions" in kernel_magic and \
                magic.split(" ", 1)[1:] == kernel_magic.split(" ", 1)[1:]:
            return [warning("nsm-vermagic", f"/nsm.ko was built for {magic.split()[0]}, the "
                            f"kernel is {kernel.release}: it loads only if its symbol versions "
                            "match", fix)]
        return [error("nsm-vermagic", f"/nsm.ko's vermagic {magic.strip()!r} differs from the "
                      f"kernel's {kernel_magic.strip()!r}: the kernel refuses the module and "
                      "init stops before the heartbeat", fix)]
    if kernel.release and magic.split(" ", 1)[0] != kernel.release:
        return [error("nsm-vermagic", f"/nsm.ko was built for {magic.split()[0]}, the kernel is "
                      f"{kernel.release}: the kernel refuses the module and init stops before "
                      "the heartbeat", fix)]
    return []
