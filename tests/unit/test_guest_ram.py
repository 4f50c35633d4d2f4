"""The enclave's RAM as a memfd the harness allocates on the enclave's CPUs while the boot goes
on, which QEMU maps and preallocates (docs/boot.md#guest-ram)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import enclave_boot, guest_ram
from harness.errors import ErrorCode, NitroError
from harness.guest_ram import GuestRam
from harness.machine import MachineError, build_command

from test_enclave_release import _config, eif, registry  # noqa: F401 - fixtures
from test_machine import option_values, spec


def _ram_fds() -> list[str]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if "nitro-enclave-ram" in target:
            out.append(target)
    return out


def test_the_memfd_is_allocated_whole_before_qemu_gets_it():
    ram = GuestRam(4, (os.sched_getaffinity(0).pop(),))
    try:
        fd = ram.ready()
        assert ram.filled_at is not None
        st = os.fstat(fd)
        # Allocated, not only sized: every block is there before QEMU maps it.
        assert (st.st_size, st.st_blocks * 512) == (4 << 20, 4 << 20)
        assert ram.qemu_path == f"/proc/self/fd/{fd}"
        assert not os.get_inheritable(fd)  # only QEMU gets it, through pass_fds
    finally:
        ram.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    ram.close()  # idempotent
    assert _ram_fds() == []


def test_a_host_without_the_memory_is_e27(monkeypatch):
    def no_memory(fd, offset, length):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(guest_ram.os, "posix_fallocate", no_memory)
    ram = GuestRam(64, ())
    try:
        with pytest.raises(NitroError) as err:
            ram.ready()
        assert err.value.code == ErrorCode.InsufficientMemoryAvailable
        assert err.value.message == ("cannot allocate the enclave's 64 MiB of RAM on this host "
                                     "(Cannot allocate memory)")
    finally:
        ram.close()
    assert _ram_fds() == []


def test_hugepage_backed_memory_is_left_to_qemu():
    cpus = SimpleNamespace(vcpu_cpus=(1,))
    assert GuestRam.unless_hugepages(512, 2048, cpus) is None
    ram = GuestRam.unless_hugepages(4, None, cpus)
    try:
        assert isinstance(ram, GuestRam)
    finally:
        ram.close()


def test_qemu_maps_the_harness_memfd_preallocated(tmp_path):
    cmd = build_command(spec(tmp_path, memory_fd=7))
    assert option_values(cmd, "-object")[0] == (
        "memory-backend-file,id=mem,size=512M,share=on,mem-path=/proc/self/fd/7,prealloc=on")
    with pytest.raises(ValueError):
        build_command(spec(tmp_path, memory_fd=7, hugepage_size_kib=2048))


def test_a_failed_start_closes_the_memfd(eif, registry, monkeypatch):  # noqa: F811
    from harness.enclave import Enclave

    monkeypatch.setattr(enclave_boot, "choose_qemu", lambda qemu, accel, arch=None: enclave_boot.QemuChoice(
        Path("/nonexistent/qemu"), SimpleNamespace(vhost_user_device_creatable=False,
                                                   has_virtio_nsm_device=False), "tcg", "test"))
    seen = []

    def refused(*args, **kwargs):
        seen.append((_ram_fds(), kwargs["memory_fd"]))
        raise NitroError(ErrorCode.EnclaveBootFailure, "machine spec refused (injected)")

    monkeypatch.setattr(enclave_boot, "machine_spec", refused)
    with pytest.raises(NitroError):
        Enclave.start(_config(eif), registry=registry)
    ((fds, memory_fd),) = seen
    assert fds == ["/memfd:nitro-enclave-ram (deleted)"] and memory_fd >= 0
    assert _ram_fds() == []


class _Machine:
    def __init__(self, error: str | None):
        self.error = error

    def launch(self, mark=None):
        if self.error:
            raise MachineError(self.error)


def test_launch_reports_a_host_out_of_memory_before_qemus_own_error(monkeypatch):
    monkeypatch.setattr(guest_ram.os, "posix_fallocate", lambda fd, offset, length: (_ for _ in ()).throw(
        OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))))
    ram = GuestRam(8, ())
    try:
        with pytest.raises(NitroError) as err:
            enclave_boot.launch(_Machine("QEMU exited with status 1 at start: os_mem_prealloc"),
                                guest_ram=ram)
        assert err.value.code == ErrorCode.InsufficientMemoryAvailable
        # QEMU's preallocation of the same file succeeded: the pages exist, the start goes on.
        enclave_boot.launch(_Machine(None), None, ram)
        assert ram.filled_at is None
    finally:
        ram.close()


def test_launch_without_a_memory_shortage_keeps_qemus_error():
    ram = GuestRam(4, ())
    try:
        with pytest.raises(NitroError) as err:
            enclave_boot.launch(_Machine("QEMU did not connect its console"), guest_ram=ram)
        assert (err.value.code, err.value.message) == (ErrorCode.EnclaveBootFailure,
                                                       "QEMU did not connect its console")
    finally:
        ram.close()
