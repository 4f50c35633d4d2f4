"""Boot probe: run guest code in a ``microvm`` under an accelerator (``kvm`` or ``tcg``) to
prove it creates the VM and runs what a kernel runs (:func:`probe_boot` -> :class:`BootProbe`).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


# The accelerator probe firmware: 64 KiB mapped at 0xFFFF0000. From the reset vector it enters
# 32-bit protected mode and, when CPUID reports BMI2, runs one VEX-encoded instruction (shlx,
# as the Linux decompressor does), then writes 0x31 to isa-debug-exit so QEMU exits with status
# (0x31 << 1) | 1 = 99 (65 if shlx computed a wrong value). Real mode alone is not enough: the
# paravirtual /dev/kvm on these hosts runs it fine but fails a stock kernel with "KVM internal
# error. Suberror: 1" (emulation failure) at exactly such a VEX instruction. Source below,
# assembled with `as --32` + `ld -m elf_i386 -Ttext=0 --oformat=binary` (tests reassemble it).
PROBE_ASM = r"""
    .code16
    .text
    .globl _start
_start:
start16:
    cli
    lgdtl %cs:gdt_desc
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(0xFFFF0000 + start32)
    .code32
start32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    cpuid
    cmpl $7, %eax
    jb pass
    movl $7, %eax
    xorl %ecx, %ecx
    cpuid
    testl $0x100, %ebx          /* CPUID.7.0:EBX[8] = BMI2 */
    jz pass
    movl $3, %eax
    movl $1, %edx
    shlxl %eax, %edx, %edx      /* VEX-encoded, as the kernel's decompressor uses */
    cmpl $8, %edx
    jne fail
pass:
    movb $0x31, %al             /* isa-debug-exit: QEMU exits (0x31 << 1) | 1 = 99 */
    outb %al, $0xf4
    hlt
fail:
    movb $0x20, %al             /* exit 65: the instruction computed a wrong value */
    outb %al, $0xf4
    hlt
    .balign 8
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    /* 0x08: flat 32-bit code */
    .quad 0x00CF92000000FFFF    /* 0x10: flat data */
gdt_desc:
    .word 23
    .long 0xFFFF0000 + gdt
    .org 0xFFF0
    .code16
reset:
    jmp start16
    .org 0x10000
"""
# PROBE_ASM assembled: the code at offset 0 and the reset vector's jmp at 0xFFF0; zeros elsewhere.
_PROBE_CODE = bytes.fromhex(
    "fa2e660f011678000f20c06683c8010f22c066ea1a00ffff080066b810008ed88ec08ed031c00fa283f807"
    "7225b80700000031c90fa2f7c3000100007414b803000000ba01000000c4e279f7d283fa087505b031e6f4"
    "f4b020e6f4f48db400000000000000000000ffff0000009acf00ffff00000092cf0017006000ffff"
)
_PROBE_RESET = bytes.fromhex("e90d00")  # jmp start16 (IP wraps to 0)
_PROBE_ROM_SIZE = 64 * 1024
_PROBE_EXIT_STATUS = (0x31 << 1) | 1


def _probe_rom() -> bytes:
    """The 64 KiB probe firmware image assembled from :data:`PROBE_ASM`."""
    rom = bytearray(_PROBE_ROM_SIZE)
    rom[: len(_PROBE_CODE)] = _PROBE_CODE
    rom[0xFFF0 : 0xFFF0 + len(_PROBE_RESET)] = _PROBE_RESET
    return bytes(rom)


@dataclass(frozen=True)
class BootProbe:
    """The result of :func:`probe_boot`: ``ok`` when the guest code ran and QEMU exited with
    the expected status; ``detail``: what happened (QEMU's first error line, or the status);
    ``seconds``: wall time of the run."""

    ok: bool
    detail: str
    seconds: float


def probe_boot(qemu: str | os.PathLike[str], accel: str, *, timeout: float = 10.0) -> BootProbe:
    """Boot a ``microvm`` under ``accel`` (``"kvm"`` or ``"tcg"``, ``-cpu max``) with the probe
    firmware (:data:`PROBE_ASM`: protected mode, a VEX instruction, then ``isa-debug-exit``);
    ``ok`` iff QEMU exits with status 99.

    This proves the accelerator creates the VM and runs the kind of guest code a kernel runs.
    On success it takes tens of milliseconds. A "KVM internal error" (QEMU then stays paused)
    ends the run at once; otherwise the run is killed after ``timeout`` seconds. Never raises
    for a failed boot; ``detail`` says why.
    """
    import selectors
    import time

    with tempfile.TemporaryDirectory(prefix="nitro-harness-boot-") as tmp:
        rom = Path(tmp) / "probe.rom"
        rom.write_bytes(_probe_rom())
        args = [
            str(qemu),
            "-machine", f"microvm,accel={accel},acpi=off,pit=off,pic=off,rtc=off",
            "-cpu", "max",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none",
            "-m", "16M", "-smp", "1",
            "-bios", str(rom),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as err:
            return BootProbe(False, f"cannot run {qemu}: {err.strerror}", 0.0)
        stderr = b""
        timed_out = False
        deadline = start + timeout
        assert proc.stderr is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = b"internal error" not in stderr
                    break
                if not sel.select(left):
                    continue
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    break  # QEMU closed stderr: it is exiting
                stderr += chunk
                if b"internal error" in stderr and b"Code=" in stderr:
                    break  # the register dump is complete; QEMU now sits paused
                if b"internal error" in stderr:
                    # QEMU reports it and then sits paused: collect the dump briefly, then stop.
                    deadline = min(deadline, time.monotonic() + 0.5)
        if proc.poll() is None:
            proc.kill()
        status = proc.wait()
        proc.stderr.close()
        seconds = time.monotonic() - start
    text = stderr.decode(errors="replace")
    if status == _PROBE_EXIT_STATUS:
        return BootProbe(True, f"{accel}: probe guest ran and exited (status 99)", seconds)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "warning:" not in ln]
    first = lines[0].replace(f"{qemu}: ", "") if lines else ""
    if "internal error" in text and "emulation failure" in text:
        first = f"{first} (emulation failure)"
    if timed_out and not first:
        first = f"no exit within {timeout:.0f} s"
    return BootProbe(
        False,
        f"{accel}: probe boot failed (exit status {status}" + (f": {first}" if first else "") + ")",
        seconds,
    )
