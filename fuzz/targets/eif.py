"""Fuzz target: the EIF reader and measurer, as ``describe-eif`` runs them on a file.

One input is a whole EIF file. It goes through :func:`harness.eif.read_eif` (the section
table, the sequential walk, metadata and signature sections, the CRC) and through
``describe-eif``'s document (:func:`harness.cli.eif_commands.describe`: the streaming PCR
measurement, the signature check, the certificate and metadata fields), written as JSON.
Declared errors: ``NitroError`` (E35 for an invalid EIF; docs/eif-format.md).
"""

from __future__ import annotations

import contextlib
import io
import json

from harness.cli.eif_commands import describe
from harness.eif import read_eif
from harness.errors import NitroError

from fuzz.scratch import MemFile

NAME = "eif"
DECLARED = (NitroError,)
#: Room for a signed EIF with small sections (the seeds are 0.3-2 KiB).
MAX_LEN = 8192

_FILE = MemFile("fuzz-eif")


def one_input(data: bytes) -> None:
    """Read, measure and describe ``data`` as an EIF file."""
    path = _FILE.holding(data)
    eif = read_eif(path)
    _ = eif.cmdline, eif.crc_ok
    with contextlib.redirect_stderr(io.StringIO()):  # describe's warnings about the layout
        json.dumps(describe(path))  # as describe-eif prints it
