"""Host requirements of a scenario (``requires: [kvm, nsm]``) and why a host lacks them."""

from __future__ import annotations

from pathlib import Path

from harness.errors import NitroError


def requirement_skip_reason(requirement: str, *, qemu: Path | str | None = None,
                            accel: str | None = None, arch: str = "x86_64") -> str | None:
    """Why this host cannot run a scenario case of architecture ``arch`` that ``requires:
    [requirement]``, or None if it can.

    ``kvm``: the accelerator the engine would choose for that architecture
    (:func:`harness.enclave_boot.choose_qemu`: ``accel`` or NITRO_HARNESS_ACCEL, else the
    doctor's probe; always TCG for a guest of another architecture than the host's) must be
    KVM. ``nsm``: that architecture's QEMU must accept ``vhost-user-device`` (the harness NSM
    over vhost-user, docs/vhost-user.md). Reasons name the fix.
    """
    from harness import enclave_boot
    from harness.arch import arch_named

    try:
        choice = enclave_boot.choose_qemu(Path(qemu) if qemu else None, accel, arch_named(arch))
    except NitroError as err:
        return f"no usable QEMU: {err.message}"
    path, info = choice.path, choice.info
    if requirement == "kvm":
        return None if choice.accel == "kvm" else (
            f"needs KVM; this host uses {choice.accel}: {choice.accel_reason}")
    if requirement == "nsm":
        if getattr(info, "vhost_user_device", False):
            return None
        return (f"needs the harness NSM: {path} refuses vhost-user-device "
                "(run nitro-harness setup --only qemu to build the patched QEMU, or set NITRO_HARNESS_QEMU)")
    return f"unknown requirement {requirement!r}"
