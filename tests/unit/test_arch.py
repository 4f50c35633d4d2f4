"""aarch64 (Graviton) EIFs: the architecture from the header's flags, the virt machine's command
line, the layout, the QEMU choice and the scenario dimension (docs/architecture.md#architectures,
docs/boot.md#aarch64-machine, docs/scenarios.md#architectures)."""

from pathlib import Path

import pytest

from harness import scenario as scn
from harness.arch import AARCH64, X86_64, arch_named, from_eif_flags
from harness.enclave_boot import choose_qemu
from harness.errors import ErrorCode, NitroError
from harness.layout import choose_layout
from harness.machine import MachineSpec, build_command
from harness.qemu import find_qemu
from harness.qemu.info import QemuInfo

AWS_AARCH64_CMDLINE = "reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on root=/dev/ram0"


def test_flag_bit_0_is_aarch64():
    assert from_eif_flags(0) == X86_64
    assert from_eif_flags(1) == AARCH64
    assert arch_named("arm64") == AARCH64 and arch_named("amd64") == X86_64
    with pytest.raises(NitroError) as err:
        arch_named("riscv64")
    assert err.value.code == ErrorCode.InvalidArgument and "riscv64" in err.value.message
    assert AARCH64.aws_cmdline == AWS_AARCH64_CMDLINE


def _spec(tmp_path, **kw):
    base = dict(
        qemu=Path("/q/qemu-system-aarch64"), accel="tcg", kernel=tmp_path / "k", initrd=tmp_path / "i",
        cmdline=AWS_AARCH64_CMDLINE, memory_mib=512, vcpu_cpus=(1, 1), other_cpus=(0,),
        state_dir=tmp_path, firmware=Path("/usr/share/qemu/qboot.rom"),
        vsock_socket=tmp_path / "vsock.sock", nsm="vhost-user", nsm_socket=tmp_path / "nsm.sock",
        acpi=False, arch=AARCH64,
    )
    base.update(kw)
    return MachineSpec(**base)


def _values(cmd, flag):
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_aarch64_boots_on_virt_with_the_pl011_console_added(tmp_path):
    cmd = build_command(_spec(tmp_path))
    assert _values(cmd, "-machine") == ["virt,gic-version=3,memory-backend=mem"]
    assert _values(cmd, "-cpu") == ["neoverse-n1"]
    # The EIF's own command line first, unchanged; the machine's console after it.
    assert _values(cmd, "-append") == [AWS_AARCH64_CMDLINE + " console=ttyAMA0"]
    # No x86 pieces: qboot, the keyboard controller, instruction counting, no_timer_check.
    assert "-bios" not in cmd and "-icount" not in cmd
    assert _values(cmd, "-device") == [
        "vhost-user-vsock-device,chardev=vsock",
        "vhost-user-device,virtio-id=33,chardev=nsm,num_vqs=1,vq_size=2",
    ]
    assert "-no-reboot" in cmd and "-nodefaults" in cmd
    assert _values(build_command(_spec(tmp_path, accel="kvm")), "-cpu") == ["host"]


def test_aarch64_layout_is_virt_and_not_choosable():
    layout = choose_layout(b"", "auto", AARCH64)
    assert layout.name == "virt" and not layout.acpi
    with pytest.raises(NitroError) as err:
        choose_layout(b"", "acpi", AARCH64)
    assert err.value.code == ErrorCode.InvalidArgument and "aarch64" in err.value.message


def test_missing_aarch64_qemu_names_the_binary_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("NITRO_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("NITRO_HARNESS_QEMU_AARCH64", raising=False)
    with pytest.raises(NitroError) as err:
        find_qemu(AARCH64)
    message = err.value.message
    assert err.value.code == ErrorCode.FileOperationFailure
    assert "qemu-system-aarch64 not found" in message and "nitro-harness setup --only qemu" in message
    assert "\n" not in message


def _info(machines):
    return QemuInfo(path=Path("/q/qemu"), version=(10, 0, 2), version_text="10.0.2",
                    machines=frozenset(machines), devices=frozenset(), accelerators=frozenset({"tcg", "kvm"}),
                    vhost_user_device_creatable=True, vhost_user_device_detail="", build_info=None,
                    data_dirs=())


def test_an_x86_qemu_refuses_an_aarch64_eif_in_one_line(monkeypatch):
    monkeypatch.setattr("harness.qemu.probe_qemu", lambda path: _info({"microvm", "nitro-enclave"}))
    with pytest.raises(NitroError) as err:
        choose_qemu(Path("/q/qemu-system-x86_64"), None, AARCH64)
    assert err.value.code == ErrorCode.FileOperationFailure and "\n" not in err.value.message
    assert "no 'virt' machine" in err.value.message and "install qemu-system-aarch64" in err.value.message


def test_a_foreign_guest_runs_under_tcg_whatever_was_asked(monkeypatch):
    monkeypatch.setattr("harness.qemu.probe_qemu", lambda path: _info({"virt"}))
    monkeypatch.setattr("harness.enclave_boot.host_arch", lambda: X86_64)
    monkeypatch.delenv("NITRO_HARNESS_ACCEL", raising=False)
    choice = choose_qemu(Path("/q/qemu-system-aarch64"), None, AARCH64)
    assert choice.accel == "tcg" and "aarch64 guest on an x86_64 host" in choice.accel_reason
    # --accel kvm for a whole run (on a KVM runner) still boots the Graviton cases, under TCG.
    asked = choose_qemu(Path("/q/qemu-system-aarch64"), "kvm", AARCH64)
    assert asked.accel == "tcg" and "(kvm was asked for)" in asked.accel_reason
    monkeypatch.setenv("NITRO_HARNESS_ACCEL", "fast")
    with pytest.raises(NitroError) as err:
        choose_qemu(Path("/q/qemu-system-aarch64"), None, AARCH64)
    assert err.value.code == ErrorCode.InvalidArgument and "NITRO_HARNESS_ACCEL=fast" in err.value.message


def test_an_aarch64_host_runs_its_own_guests_under_kvm_where_dev_kvm_opens(monkeypatch):
    from harness.host import DeviceNode, KvmStatus

    def kvm(opens):
        node = DeviceNode("/dev/kvm", opens, opens, opens, None if opens else "No such file")
        return KvmStatus(node, 12 if opens else None, None, False, None, None)

    monkeypatch.setattr("harness.qemu.probe_qemu", lambda path: _info({"virt"}))
    monkeypatch.setattr("harness.enclave_boot.host_arch", lambda: AARCH64)
    monkeypatch.delenv("NITRO_HARNESS_ACCEL", raising=False)
    monkeypatch.setattr("harness.host.kvm_status", lambda: kvm(True))
    assert choose_qemu(Path("/q/qemu-system-aarch64"), None, AARCH64).accel == "kvm"
    monkeypatch.setattr("harness.host.kvm_status", lambda: kvm(False))
    assert choose_qemu(Path("/q/qemu-system-aarch64"), None, AARCH64).accel == "tcg"
    # An x86_64 EIF on that host is the foreign one.
    monkeypatch.setattr("harness.qemu.probe_qemu", lambda path: _info({"microvm"}))
    assert choose_qemu(Path("/q/qemu-system-x86_64"), None, X86_64).accel == "tcg"


def test_run_wide_qemu_option_finds_the_aarch64_binary_beside_it(tmp_path, monkeypatch):
    for name in ("qemu-system-x86_64", "qemu-system-aarch64"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    seen = []
    monkeypatch.setattr("harness.qemu.probe_qemu", lambda path: seen.append(path) or _info({"virt"}))
    monkeypatch.setattr("harness.enclave_boot.host_arch", lambda: X86_64)
    choose_qemu(tmp_path / "qemu-system-x86_64", None, AARCH64)
    assert seen == [tmp_path / "qemu-system-aarch64"]


def test_a_flag_that_disagrees_with_the_kernel_is_refused_at_boot(tmp_path):
    from harness.bzimage import KernelImage
    from harness.enclave_boot import check_kernel_arch

    bz = KernelImage("bzImage", "x86_64", None, 0, None, None, "")
    check_kernel_arch(tmp_path / "a.eif", bz, X86_64)
    with pytest.raises(NitroError) as err:
        check_kernel_arch(tmp_path / "a.eif", bz, AARCH64)
    assert err.value.code == ErrorCode.EifParsingError
    assert "a.eif: flags: an aarch64 image (bit 0 set)" in err.value.message
    assert "x86_64 (bzImage)" in err.value.message


SCENARIOS = """\
name: greet
image: hello
steps:
  - console: {expect: "Hello from the enclave side"}
---
name: py
image: python
steps:
  - console: {expect: "x"}
"""


def test_scenarios_gain_an_arch_dimension(tmp_path, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIOS)
    monkeypatch.setattr("harness.scenario.loader.recipe_exists", lambda name: name == "hello-arm64")
    cases = scn.load_scenarios(path, arches=["x86_64", "aarch64"])
    assert [(c.id, c.data["image"], c.arch) for c in cases] == [
        ("greet", "hello", "x86_64"),
        ("greet[arch=aarch64]", "hello-arm64", "aarch64"),
        ("py", "python", "x86_64"),  # no python-arm64 recipe: left out on aarch64
    ]
    # On the Debian kernel there is no arm64 twin.
    debian = scn.load_scenarios(path, kernels=["debian"], arches=["aarch64"])
    assert debian == []
    with pytest.raises(NitroError) as err:
        scn.load_scenarios(path, arches=["sparc"])
    assert err.value.code == ErrorCode.InvalidArgument
    # A scenario written for a Graviton image runs there only, on the Nitro-style kernel.
    arm = tmp_path / "arm.yaml"
    arm.write_text(SCENARIOS.split("---")[0].replace("image: hello", "image: hello-arm64"))
    assert [(c.id, c.arch) for c in scn.load_scenarios(arm, kernels=["nitro", "debian"],
                                                        arches=["x86_64", "aarch64"])] == [
        ("greet", "aarch64")]
    assert scn.image_for("hello", "nitro", "aarch64") == "hello-arm64"
    assert scn.image_for_arch("hello-arm64", "aarch64") == "hello-arm64"
