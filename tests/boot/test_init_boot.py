"""The enclave's init booting (docs/boot.md#init): the hello image and small variants run on a
real QEMU through the enclave engine, and the console alone shows that init performs its steps
in order, sends the heartbeat, runs the application and ends the VM when the application
exits. The init binary itself is checked in tests/unit/test_init.py.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from harness.images import recipes

#: init's console lines in the order of docs/boot.md#init for the hello image (modules first:
#: Debian kernel).
_HELLO_STEPS = [
    r"nitro-init: started \(pid 1\)",
    r"nitro-init: mounted devtmpfs on /dev, console on stdio",
    r"nitro-init: loaded module virtio_mmio\.ko",
    r"nitro-init: loaded module vsock\.ko",
    r"nitro-init: loaded module vmw_vsock_virtio_transport_common\.ko",
    r"nitro-init: loaded module vmw_vsock_virtio_transport\.ko",
    r"nitro-init: loaded 4 module\(s\) from /modules/order",
    r"nitro-init: loaded /nsm\.ko",
    r"nitro-init: heartbeat: sent 0xB7 to vsock 3:9000 and got it back",
    r"nitro-init: read /env: 1 variable\(s\)",
    r"nitro-init: read /cmd: 1 argument\(s\)",
    r"nitro-init: switched root to /rootfs",
    r"nitro-init: mounted proc, /run, /tmp, /dev, /dev/shm, /dev/pts, sysfs \(0 optional failed\)",
    r"nitro-init: mounted \d+ cgroup v1 controller\(s\)",
    r"nitro-init: starting application: '/usr/bin/hello' \(1 environment variable\(s\)\)",
    r"\[   1\] Hello from the enclave side!",
    r"\[   2\] Hello from the enclave side!",
]


def _qemu_or_skip() -> list[str]:
    """Skip without a usable QEMU; return extra QEMU arguments for these boots.

    Under TCG on a loaded host the guest's quick PIT calibration of the TSC fails now and then,
    and the kernel then waits forever for its first timer tick (a machine problem, tested by
    the engine's own boot tests, not an init one). ``-icount shift=auto`` ties guest time to
    executed instructions so the calibration always succeeds; these tests are about init.
    """
    from harness import doctor, host, qemu
    from harness.errors import NitroError
    try:
        info = qemu.probe_qemu(qemu.find_qemu())
    except NitroError as err:
        pytest.skip(f"no usable QEMU to boot with: {err.message}")
    accel, _reason = doctor.choose_accelerator(info, host.kvm_status())
    return ["-icount", "shift=auto"] if accel == "tcg" else []


@pytest.fixture
def short_run_dir():
    """A short runtime directory: vhost-user socket paths must fit AF_UNIX's 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="nh-init-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _boot(tmp_path: Path, run_dir: Path, eif: Path, memory_mib: int = 256):
    from harness.enclave import Enclave, EnclaveConfig
    from harness.registry import Registry
    extra = _qemu_or_skip()
    return Enclave.start(
        EnclaveConfig(eif_path=eif, memory_mib=memory_mib, cpu_count=1, debug_mode=True,
                      heartbeat_timeout=120, extra_qemu_args=extra),
        registry=Registry(run_dir), artifacts_dir=tmp_path / "art")


def _remove_built(built) -> None:
    """Delete a one-off ``recipes.build`` image: its EIF and the .json beside it."""
    Path(built.info["EifPath"]).unlink(missing_ok=True)
    Path(built.info["EifPath"]).with_suffix(".json").unlink(missing_ok=True)


def test_hello_boot_follows_init_order(tmp_path, short_run_dir):
    """Every init step appears once, in order; the hello application then prints its lines.

    On Debian's kernel, whose vsock and virtio-mmio drivers are modules, so the modules/ step
    runs too (the shipped hello's Nitro-style kernel skips it; test_init_path_on_nitro_kernel)."""
    enclave = _boot(tmp_path, short_run_dir, recipes.build_image("hello-debian"))
    try:
        enclave.console.expect(r"\[   2\] Hello from the enclave side!", timeout=60)
        text = enclave.console.text()
        pos = 0
        for step in _HELLO_STEPS:
            m = re.compile(step).search(text, pos)
            assert m, f"{step!r} missing after offset {pos}:\n{text[-3000:]}"
            pos = m.end()
        assert "nitro-init: fatal" not in text
        # AWS's "nomodules" is no kernel parameter (the kernel's is "nomodule"): the kernel
        # hands it to init and module loading stays enabled, as the loaded modules show.
        assert 'Unknown kernel command line parameters "nomodules"' in text
        # Only optional cgroup v1 controllers may fail (6.12 without MEMCG_V1/CPUSETS_V1).
        warnings = re.findall(r"nitro-init: warning: (.*) \(t=", text)
        assert all(w.startswith("mount cgroup ") for w in warnings), warnings
        # Boot-to-init and boot-to-heartbeat as init measured them (CLOCK_BOOTTIME).
        t_init = float(re.search(r"nitro-init: started \(pid 1\) \(t=([\d.]+)s\)", text)[1])
        t_hb = float(re.search(r"got it back \(t=([\d.]+)s\)", text)[1])
        assert 0 < t_init <= t_hb
        print(f"boot-to-init {t_init:.3f} s, boot-to-heartbeat {t_hb:.3f} s "
              f"(accelerator {enclave.accel})")
    finally:
        enclave.terminate()


def test_app_exit_reboots_and_ends_the_enclave(tmp_path, short_run_dir):
    """The application's exit status is logged, init reboots, the VM ends
    (docs/boot.md#enclave-end)."""
    built = recipes.build("hello", cmd=["sh", "-c", "echo app-ran-with-$0; exit 3"],
                          env=["A=1", "B=2"])
    try:
        enclave = _boot(tmp_path, short_run_dir, built.path)
        try:
            assert enclave.wait(60), "the enclave did not end after the application exited"
            text = enclave.console.text()
            assert "nitro-init: read /env: 2 variable(s)" in text
            # argv[0] 'sh' was searched in init's path (docs/boot.md#init) and found as /bin/sh.
            assert "nitro-init: starting application: 'sh' '-c'" in text
            assert "app-ran-with-sh" in text
            assert "nitro-init: application exited with status 3; rebooting" in text
        finally:
            enclave.terminate()
    finally:
        _remove_built(built)


def test_missing_program_is_reported_and_ends_the_enclave(tmp_path, short_run_dir):
    built = recipes.build("hello", cmd=["no-such-program"])
    try:
        enclave = _boot(tmp_path, short_run_dir, built.path)
        try:
            assert enclave.wait(60)
            text = enclave.console.text()
            assert ("nitro-init: fatal: exec no-such-program (searched in "
                    "/sbin:/usr/sbin:/bin:/usr/bin): No such file or directory") in text
            assert "nitro-init: application exited with status 127; rebooting" in text
        finally:
            enclave.terminate()
    finally:
        _remove_built(built)


def test_init_path_on_nitro_kernel(tmp_path, short_run_dir):
    """With drivers built in (AWS's blobs, the harness's kernel) init skips modules/ and the
    rest of init's order (docs/boot.md#init) is unchanged."""
    enclave = _boot(tmp_path, short_run_dir, recipes.build_image("hello"))
    try:
        enclave.console.expect(r"\[   1\] Hello from the enclave side!", timeout=60)
        text = enclave.console.text()
        steps = [
            r"nitro-init: started \(pid 1\)",
            r"nitro-init: no /modules/order: kernel has its drivers built in",
            r"nitro-init: loaded /nsm\.ko",
            r"nitro-init: heartbeat: sent 0xB7 to vsock 3:9000 and got it back",
            r"nitro-init: switched root to /rootfs",
            r"nitro-init: starting application: '/usr/bin/hello'",
        ]
        pos = 0
        for step in steps:
            m = re.compile(step).search(text, pos)
            assert m, f"{step!r} missing after offset {pos}"
            pos = m.end()
        assert "nitro-init: warning" not in text  # cgroup v1 cpuset and memory are configured
    finally:
        enclave.terminate()
