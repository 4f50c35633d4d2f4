"""One enclave's NSM state: the PCR bank, PCR locking and debug-mode zeroing.

docs/pcrs.md#pcr-bank and docs/nsm.md#pcr-bank: 32 PCRs of SHA-384; PCR0/1/2/8 from the EIF,
PCR3 from the parent's role ARN, PCR4 from the parent instance ID, PCRs 0-15 locked at boot,
16-31 zero and user-extendable. Errors follow QEMU's virtio-nsm where the real device's choice is
unknown: index >= 32 -> InvalidIndex; extend or lock of a locked PCR -> ReadOnlyIndex;
LockPCRs{range > 32} -> InvalidIndex.
"""

from __future__ import annotations

import threading

from harness.nsm.messages import Attestation, NsmErrorCode, NsmRequestError
from harness.pcr import PCR_SIZE, ZERO_PCR, Measurements, extend, pcr_for_instance_id, pcr_for_role_arn

#: PCRs in the bank.
MAX_PCRS = 32
#: PCRs locked at boot (docs/nsm.md#pcr-bank).
BOOT_LOCKED = range(16)
#: PCRs a document carries (docs/attestation.md#payload: keys 0..15).
DOCUMENT_PCRS = range(16)
#: PCRs zeroed in debug-mode documents (docs/pcrs.md#debug-mode); PCR3 and PCR4 keep their values.
DEBUG_ZEROED = (0, 1, 2, 8)
#: Strict-mode size limits (docs/nsm.md#limits: the NSM documentation's, the real NSM enforces none).
STRICT_LIMITS = {"user_data": 512, "nonce": 512, "public_key": 1024}


class NsmState:
    """The PCR bank and identity of one enclave's NSM.

    ``measurements`` gives PCR0/1/2 (and PCR8 when the EIF is signed), a
    :class:`harness.pcr.Measurements` or a ``{index: bytes}`` dict; ``parent_role_arn`` and
    ``instance_id`` set PCR3 and PCR4 (docs/pcrs.md#parent-pcrs); PCRs 0-15 are locked at boot (docs/nsm.md#pcr-bank).
    ``module_id`` is the enclave ID DescribeNSM and documents report. ``strict`` enforces the
    documented size limits on Attestation fields (user_data/nonce 512, public_key 1024) with
    InvalidArgument; by default, like the real NSM, nothing is enforced. Thread-safe.
    """

    def __init__(
        self,
        measurements: Measurements | dict[int, bytes],
        *,
        module_id: str,
        debug_mode: bool = False,
        parent_role_arn: str | None = None,
        instance_id: str | None = None,
        version: tuple[int, int, int] = (1, 0, 0),
        strict: bool = False,
    ):
        values = measurements.as_dict() if isinstance(measurements, Measurements) else dict(measurements)
        self.pcrs: list[bytes] = [ZERO_PCR] * MAX_PCRS
        for index, value in values.items():
            if not 0 <= index < MAX_PCRS or len(value) != PCR_SIZE:
                raise ValueError(f"measurement PCR{index} must be {PCR_SIZE} bytes at an index below {MAX_PCRS}")
            self.pcrs[index] = bytes(value)
        if parent_role_arn is not None:
            self.pcrs[3] = pcr_for_role_arn(parent_role_arn)
        if instance_id is not None:
            self.pcrs[4] = pcr_for_instance_id(instance_id)
        self.locked: set[int] = set(BOOT_LOCKED)
        self.module_id = module_id
        self.debug_mode = debug_mode
        self.version = tuple(version)
        self.strict = strict
        self._lock = threading.RLock()

    def _check_index(self, index: int) -> None:
        if not 0 <= index < MAX_PCRS:
            raise NsmRequestError(NsmErrorCode.InvalidIndex, f"PCR{index} >= {MAX_PCRS}")

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        """Return (locked, value) of PCR ``index``. Raises NsmRequestError(InvalidIndex)."""
        with self._lock:
            self._check_index(index)
            return index in self.locked, self.pcrs[index]

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data`` and return the new value (docs/pcrs.md#extend-rule: SHA384(old ||
        data)). Raises NsmRequestError(InvalidIndex | ReadOnlyIndex)."""
        with self._lock:
            self._check_index(index)
            if index in self.locked:
                raise NsmRequestError(NsmErrorCode.ReadOnlyIndex, f"PCR{index} is locked")
            self.pcrs[index] = extend(self.pcrs[index], data)
            return self.pcrs[index]

    def lock_pcr(self, index: int) -> None:
        """Lock PCR ``index``. Locking a locked PCR fails with ReadOnlyIndex (AWS's self-check
        expects LockPCR on 0-15 to fail); InvalidIndex past the bank."""
        with self._lock:
            self._check_index(index)
            if index in self.locked:
                raise NsmRequestError(NsmErrorCode.ReadOnlyIndex, f"PCR{index} is already locked")
            self.locked.add(index)

    def lock_pcrs(self, range_: int) -> None:
        """Lock PCRs [0, range_) (docs/nsm.md#pcr-bank); already locked ones are fine. ``range_`` > 32 is
        InvalidIndex (LockPCRs{32} succeeds, {33} fails)."""
        with self._lock:
            if not 0 <= range_ <= MAX_PCRS:
                raise NsmRequestError(NsmErrorCode.InvalidIndex, f"range {range_} > {MAX_PCRS}")
            self.locked.update(range(range_))

    def locked_pcrs(self) -> list[int]:
        """Sorted list of locked PCR indexes."""
        with self._lock:
            return sorted(self.locked)

    def document_pcrs(self) -> dict[int, bytes]:
        """PCRs 0-15 as a document carries them: in debug mode PCR0, 1, 2 and 8 read as zero,
        PCR3 and PCR4 keep their values (docs/pcrs.md#debug-mode)."""
        with self._lock:
            out = {i: self.pcrs[i] for i in DOCUMENT_PCRS}
        if self.debug_mode:
            for i in DEBUG_ZEROED:
                out[i] = ZERO_PCR
        return out

    def check_attestation_fields(self, request: Attestation) -> None:
        """In strict mode, raise InvalidArgument for fields over the documented limits."""
        if not self.strict:
            return
        for name, limit in STRICT_LIMITS.items():
            value = getattr(request, name)
            if value is not None and len(value) > limit:
                raise NsmRequestError(NsmErrorCode.InvalidArgument, f"{name} is {len(value)} bytes > {limit}")
