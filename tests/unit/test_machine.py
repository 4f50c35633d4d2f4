"""QEMU command line shaped like a Nitro enclave (docs/architecture.md#faithfulness,
point 5; docs/boot.md#qemu-machine)."""

from pathlib import Path

from harness.machine import MachineSpec, build_command


def spec(tmp_path, **kw):
    base = dict(
        qemu=Path("/q/qemu-system-x86_64"), accel="tcg", kernel=tmp_path / "k", initrd=tmp_path / "i",
        cmdline="reboot=k panic=30 pci=off nomodules console=ttyS0", memory_mib=512,
        vcpu_cpus=(1, 1), other_cpus=(0,), state_dir=tmp_path, firmware=Path("/usr/share/qemu/qboot.rom"),
        vsock_socket=tmp_path / "vsock.sock", nsm="vhost-user", nsm_socket=tmp_path / "nsm.sock",
    )
    base.update(kw)
    return MachineSpec(**base)


def option_values(cmd, flag):
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_no_network_no_disk_and_no_defaults(tmp_path):
    cmd = build_command(spec(tmp_path))
    assert "-nodefaults" in cmd and "-no-reboot" in cmd
    joined = " ".join(cmd)
    for forbidden in ("-netdev", "-nic", "-drive", "virtio-net", "virtio-blk", "-hda", "-cdrom"):
        assert forbidden not in joined


def test_shared_memfd_preallocated_and_locked(tmp_path):
    cmd = build_command(spec(tmp_path))
    assert "memory-backend-memfd,id=mem,size=512M,share=on,prealloc=on" in option_values(cmd, "-object")
    assert option_values(cmd, "-machine") == ["microvm,memory-backend=mem,acpi=on"]
    assert option_values(cmd, "-overcommit") == ["mem-lock=on-fault"]
    huge = build_command(spec(tmp_path, hugepage_size_kib=2048))
    assert any("hugetlb=on,hugetlbsize=2048K" in o for o in option_values(huge, "-object"))


def test_devices_vsock_and_nsm_over_vhost_user(tmp_path):
    cmd = build_command(spec(tmp_path))
    devices = option_values(cmd, "-device")
    assert devices == [
        "i8042",
        "vhost-user-vsock-device,chardev=vsock",
        "vhost-user-device,virtio-id=33,chardev=nsm,num_vqs=1,vq_size=2",
    ]
    assert option_values(cmd, "-smp") == ["2"]
    assert option_values(cmd, "-append") == ["reboot=k panic=30 pci=off nomodules console=ttyS0"]
    tcg_nitro = build_command(spec(tmp_path, acpi=False))
    assert option_values(tcg_nitro, "-append") == ["reboot=k panic=30 pci=off nomodules console=ttyS0 no_timer_check"]
    kvm_nitro = build_command(spec(tmp_path, acpi=False, accel="kvm"))
    assert option_values(kvm_nitro, "-append") == ["reboot=k panic=30 pci=off nomodules console=ttyS0"]
    qemu_nsm = build_command(spec(tmp_path, nsm="qemu", nsm_socket=None))
    assert "virtio-nsm-device" in option_values(qemu_nsm, "-device")
    no_nsm = build_command(spec(tmp_path, nsm=None, nsm_socket=None))
    assert option_values(no_nsm, "-device") == ["i8042", "vhost-user-vsock-device,chardev=vsock"]


def test_kvm_uses_host_cpu_and_acpi_off_for_nitro_kernels(tmp_path):
    cmd = build_command(spec(tmp_path, accel="kvm", acpi=False))
    assert option_values(cmd, "-accel") == ["kvm"]
    assert option_values(cmd, "-cpu") == ["host"]
    assert option_values(cmd, "-machine") == ["microvm,memory-backend=mem,acpi=off"]


def test_memory_locked_on_fault_where_qemu_has_it(tmp_path):
    # Guest RAM is preallocated, so it is resident and locked either way; mem-lock=on would also
    # populate and lock TCG's 1 GiB code buffer before the guest starts.
    assert option_values(build_command(spec(tmp_path)), "-overcommit") == ["mem-lock=on-fault"]
    older = build_command(spec(tmp_path, mem_lock_on_fault=False))
    assert option_values(older, "-overcommit") == ["mem-lock=on"]
    assert "-overcommit" not in build_command(spec(tmp_path, mem_lock=False))
    assert option_values(build_command(spec(tmp_path)), "-accel") == ["tcg"]


def test_launcher_binds_qemu_to_the_harness_and_other_cpus():
    from harness.machine import launcher

    assert launcher((0,)) == ["setpriv", "--pdeathsig", "KILL", "--", "taskset", "--cpu-list", "0"]


def test_icount_only_for_acpi_guests_under_tcg(tmp_path):
    assert option_values(build_command(spec(tmp_path, acpi=True)), "-icount") == ["shift=auto"]
    assert "-icount" not in build_command(spec(tmp_path, acpi=False))
    assert "-icount" not in build_command(spec(tmp_path, accel="kvm", acpi=True))


def test_shutdown_without_qmp_kills_qemu_and_never_raises(tmp_path):
    # QEMU that never opened QMP cannot be asked to quit: the shutdown kills it at once and
    # returns, so a failed start reports its own error rather than a shutdown timeout.
    import subprocess
    import time

    from harness.machine import QemuMachine

    machine = QemuMachine(spec(tmp_path))
    machine.process = subprocess.Popen(["sleep", "60"])
    started = time.monotonic()
    machine.shutdown(grace=0.5)
    machine.shutdown(grace=0.5)  # idempotent
    assert machine.process.poll() == -9
    assert time.monotonic() - started < 5


def test_a_qemu_that_exits_at_start_is_reported_at_once_with_the_boot_timeline_marks(tmp_path):
    # The console wait watches QEMU's pidfd: an exit before the console connects is reported as
    # that exit (not as a 30 s timeout), with what QEMU printed.
    import pytest

    from harness.machine import MachineError, QemuMachine

    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: -machine microvm: no such machine' >&2\nexit 3\n")
    fake.chmod(0o755)
    marks = []
    machine = QemuMachine(spec(tmp_path, qemu=fake, other_cpus=()))
    with pytest.raises(MachineError) as err:
        machine.launch(timeout=30, mark=marks.append)
    machine.shutdown()
    assert str(err.value) == ("QEMU exited with status 3 at start: "
                              "qemu: qemu: -machine microvm: no such machine")
    assert marks == ["qemu_spawned"]
