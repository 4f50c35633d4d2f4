"""Host requirements of a scenario (``requires: [kvm, nsm]``) and why a host lacks them."""

from __future__ import annotations

import os
from pathlib import Path

from harness.errors import NitroError


def requirement_skip_reason(requirement: str, *, qemu: Path | str | None = None,
                            accel: str | None = None) -> str | None:
    """Why this host cannot run a scenario that ``requires: [requirement]``, or None if it can.

    ``kvm``: the accelerator the engine would choose (``accel`` or NITRO_HARNESS_ACCEL, else the
    doctor's probe) must be KVM. ``nsm``: the QEMU must accept ``vhost-user-device`` (the
    harness NSM over vhost-user, docs/vhost-user.md). Reasons come from ``harness.doctor`` and
    name the fix.
    """
    from harness import doctor, host, qemu as qemu_mod

    try:
        path = Path(qemu) if qemu else qemu_mod.find_qemu()
        info = qemu_mod.probe_qemu(path)
    except NitroError as err:
        return f"no usable QEMU: {err.message}"
    if requirement == "kvm":
        chosen = accel or os.environ.get("NITRO_HARNESS_ACCEL")
        reason = "chosen by --accel/NITRO_HARNESS_ACCEL"
        if not chosen:
            chosen, reason = doctor.choose_accelerator(info, host.kvm_status())
        return None if chosen == "kvm" else f"needs KVM; this host uses {chosen}: {reason}"
    if requirement == "nsm":
        if getattr(info, "vhost_user_device", False):
            return None
        return (f"needs the harness NSM: {path} refuses vhost-user-device "
                "(run nitro-harness setup --only qemu to build the patched QEMU, or set NITRO_HARNESS_QEMU)")
    return f"unknown requirement {requirement!r}"
