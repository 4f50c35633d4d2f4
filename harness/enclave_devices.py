"""The device back ends of one enclave: vsock and NSM, each a vhost-user back end QEMU connects to.

The vsock device puts the parent at CID 3 and binds the heartbeat listener (port 9000) before
QEMU starts, as nitro-cli does (docs/boot.md#heartbeat-wait, docs/vsock.md#heartbeat); its packet
headers go to ``vsock.trace``. The NSM is the harness's own (signed attestation documents,
docs/nsm.md#device), QEMU's unsigned virtio-nsm, or none, as the configuration and the QEMU allow
(docs/nsm.md#qemu-virtio-nsm). The back ends' threads are kept off the enclave's CPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import ErrorCode, NitroError
from harness.heartbeat_wait import HEARTBEAT_PORT

__all__ = ["EnclaveDevices"]


class EnclaveDevices:
    """The running back ends of one enclave.

    ``vsock`` (:class:`harness.vsock.VsockDevice`, the parent's side) and ``heartbeat`` (its
    :class:`harness.vsock.HeartbeatListener`) once :meth:`start_vsock` ran; ``nsm``
    (:class:`harness.nsm.Nsm` or None) with ``nsm_status`` saying why; ``backends`` the started
    :class:`harness.vhost_user.VhostUserBackend` objects (each with ``error`` set when it failed).
    ``on_vsock``, when given, is called with the vsock device once it serves and before QEMU
    starts, so that parent listeners (a scenario's vsock-proxies) exist before the guest runs.
    """

    def __init__(self, on_vsock: Callable[[Any], None] | None = None) -> None:
        self.on_vsock = on_vsock
        self.backends: list[Any] = []
        self.vsock: Any = None
        self.heartbeat: Any = None
        self.nsm: Any = None
        self.nsm_status = "not started"
        self._vsock_trace: Any = None
        self.state_dir: Path | None = None
        self._named: dict[str, Any] = {}  # "vsock"/"nsm" -> its back end, for the timeline

    def start_vsock(self, state_dir: Path, cid: int) -> None:
        """Start the vsock device for guest ``cid`` on ``state_dir/vsock.sock``, with the
        heartbeat listener bound first (docs/boot.md#heartbeat-wait) and packet headers traced to
        ``state_dir/vsock.trace`` (one JSON object a line), then ``on_vsock``. Raises OSError or
        NitroError when the socket cannot be created, or what ``on_vsock`` raises; what was
        started is still released by :meth:`stop`."""
        from harness.vhost_user import VhostUserBackend
        from harness.vsock import VsockDevice

        self.state_dir = state_dir
        # Packet headers for the artifacts folder (kept when a test fails).
        self._vsock_trace = open(state_dir / "vsock.trace", "a", buffering=1 << 16)
        trace_file = self._vsock_trace
        self.vsock = VsockDevice(cid, trace=lambda event: trace_file.write(json.dumps(event) + "\n"))
        # docs/boot.md#heartbeat-wait: nitro-cli listens for the heartbeat before it starts the
        # enclave.
        self.heartbeat = self.vsock.heartbeat(HEARTBEAT_PORT)
        backend = VhostUserBackend(state_dir / "vsock.sock", self.vsock, offer_config=True)
        backend.start()
        self.backends.append(backend)
        self._named["vsock"] = backend
        if self.on_vsock is not None:
            self.on_vsock(self.vsock)

    def start_nsm(
        self,
        mode: str,
        qemu_info: Any,
        state_dir: Path,
        *,
        measurements: Any,
        module_id: str,
        debug_mode: bool,
        parent_role_arn: str | None,
        instance_id: str,
        pki_dir: Path | None,
    ) -> tuple[str | None, Path | None]:
        """Start the NSM ``mode`` asks for (``auto``, ``harness``, ``qemu``, ``none``; see
        :class:`harness.enclave.EnclaveConfig`) as far as ``qemu_info``
        (:class:`harness.qemu.QemuInfo`) allows, and set ``nsm_status``.

        Returns the machine's NSM kind and socket: ``("vhost-user", state_dir/nsm.sock)`` for the
        harness NSM (PCRs from ``measurements``, ``module_id`` the enclave ID, PCR3/PCR4 from the
        parent role and instance ID: docs/pcrs.md#parent-pcrs; requests traced to
        ``state_dir/nsm.trace``), ``("qemu", None)`` for QEMU's own virtio-nsm, ``(None, None)``
        for none. Raises NitroError E36 when ``harness`` is required and this QEMU cannot create
        vhost-user-device.
        """
        if mode == "none":
            self.nsm_status = "disabled by configuration"
            return None, None
        if mode in ("auto", "harness") and qemu_info.vhost_user_device_creatable:
            from harness.nsm import Nsm, NsmState, trace_writer
            from harness.nsm.device import NsmDevice
            from harness.pki import Pki
            from harness.vhost_user import VhostUserBackend

            state = NsmState(
                measurements,
                module_id=module_id,
                debug_mode=debug_mode,
                parent_role_arn=parent_role_arn,
                instance_id=instance_id,
            )
            self.nsm = Nsm(state, Pki.load_or_create(pki_dir), trace=trace_writer(state_dir / "nsm.trace"))
            socket_path = state_dir / "nsm.sock"
            backend = VhostUserBackend(socket_path, NsmDevice(self.nsm), offer_config=False)
            backend.start()
            self.backends.append(backend)
            self._named["nsm"] = backend
            self.nsm_status = "harness NSM (signed attestation documents)"
            return "vhost-user", socket_path
        if mode == "harness":
            raise NitroError(
                ErrorCode.EnclaveBootFailure,
                "this QEMU cannot create vhost-user-device, so it cannot host the harness NSM "
                "(run nitro-harness setup --only qemu to build the patched QEMU, or use nsm: auto)",
            )
        if mode == "qemu" and qemu_info.has_virtio_nsm_device:
            self.nsm_status = "QEMU's own virtio-nsm: documents are unsigned and fail verification"
            return "qemu", None
        self.nsm_status = (
            "no NSM: this QEMU refuses vhost-user-device (run nitro-harness setup --only qemu for the "
            "patched QEMU)"
        )
        return None, None

    def place_threads(self, console_thread: int | None, others: tuple[int, ...]) -> None:
        """Pin the console reader (native thread ID ``console_thread``) and every back end's
        thread to the host CPUs ``others``, off the enclave's CPUs (docs/boot.md#isolation).
        Best effort: a thread that is gone or a CPU set the host refuses is skipped."""
        ids = [console_thread] + [b.native_id for b in self.backends]
        for tid in ids:
            if tid:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, set(others))

    def milestones(self) -> list[tuple[str, float]]:
        """``(boot timeline phase, time.monotonic())`` of what each back end saw so far: QEMU
        connecting its socket (``vsock_connected``), QEMU's first vhost-user message, sent when
        it realizes the device (``vsock_handshake``), and the guest's driver starting every ring
        (``vsock_driver_ready``); likewise ``nsm_...`` (docs/boot.md#boot-timeline)."""
        phases = {"connected": "connected", "handshake": "handshake", "rings": "driver_ready"}
        return [(f"{name}_{phases[key]}", when)
                for name, backend in self._named.items()
                for key, when in sorted(dict(backend.times).items(), key=lambda kv: kv[1])]

    def _ring_snapshots(self) -> list[str]:
        """One JSON line per journalled queue with its ring contents, taken before the back ends
        stop (they unmap guest RAM)."""
        out = []
        for backend in self.backends:
            for q in backend.queues:
                if q.journal is not None:
                    with contextlib.suppress(Exception):
                        out.append(f"{type(backend.device).__name__} {q.name} ring "
                                   + json.dumps(q.snapshot()))
        return out

    def _write_journals(self, rings: list[str]) -> None:
        """Write the virtqueue journals (NITRO_HARNESS_VRING_JOURNAL) to ``vring.journal`` in the
        state folder, one line per pop or push, so they are kept with the artifacts."""
        lines = list(rings)
        for backend in self.backends:
            device = type(backend.device).__name__
            for q in backend.queues:
                for op in q.journal or ():
                    lines.append(f"{device} {q.name} " + " ".join(map(str, op)))
        if lines and self.state_dir is not None:
            with contextlib.suppress(OSError):
                (self.state_dir / "vring.journal").write_text("\n".join(lines) + "\n")

    def stop(self) -> list[str]:
        """Stop every back end, close the vsock device and its trace (idempotent).

        Never raises for a back end that would not stop: its failure (where its thread is stuck)
        is returned, one string each, after its fds and guest memory were released anyway.
        """
        stuck: list[str] = []
        rings = self._ring_snapshots()
        for backend in self.backends:
            try:
                backend.stop()  # releases its fds and guest memory even when it fails
            except Exception as e:
                stuck.append(str(e))
        self._write_journals(rings)
        if self.vsock is not None:
            with contextlib.suppress(Exception):
                self.vsock.close()
        if self._vsock_trace is not None:
            with contextlib.suppress(OSError):
                self._vsock_trace.close()
        return stuck
