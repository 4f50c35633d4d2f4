"""Fuzz target: the NSM's request path, CBOR bytes in and response bytes out.

One input is one flag byte and a request as the guest's driver hands it over. Bit 0 of the flag
byte turns on strict mode (the documented size limits), bit 1 debug mode; the rest goes to
:meth:`harness.nsm.Nsm.handle` (decode, PCR operations, attestation documents signed by a
harness PKI, response encoding; docs/nsm.md). ``handle`` answers every request with bytes and
documents no exception, so nothing is declared; its answer must decode as a response.
"""

from __future__ import annotations

import functools

from harness.nsm import Nsm, NsmState, decode_response
from harness.pki import Pki

NAME = "nsm"
DECLARED: tuple[type[BaseException], ...] = ()
#: The device takes requests up to 0x1000 bytes; a little more reaches InputTooLarge.
MAX_LEN = 4200


@functools.cache
def _pki() -> Pki:
    return Pki.create()


def one_input(data: bytes) -> None:
    """Answer ``data[1:]`` with a fresh NSM configured by ``data[0]``."""
    flags = data[0] if data else 0
    state = NsmState({0: b"\x01" * 48, 1: b"\x02" * 48, 2: b"\x03" * 48},
                     module_id="i-0123456789abcdef0-enc0123456789abcdef", debug_mode=bool(flags & 2),
                     parent_role_arn="arn:aws:iam::111122223333:role/fuzz", strict=bool(flags & 1))
    decode_response(Nsm(state, _pki()).handle(data[1:]))
