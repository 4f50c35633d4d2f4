"""Adding CA certificates to an image's trust stores: ``build-enclave --ca-bundle FILE``.

An enclave application that speaks TLS to ``kms.<region>.amazonaws.com`` checks the server's
certificate against its image's trust store; to reach the KMS emulator instead of AWS, unchanged,
the image must trust the emulator's CA (docs/kms.md#tls). The rule (docs/nitro-cli.md#build-enclave):

* ``/etc/ssl/certs/ca-certificates.crt`` (Debian, Ubuntu, Alpine; Go's and OpenSSL's usual
  default) gains the certificates at its end; an image without it gets one, holding the first
  other system bundle found (so public CAs stay trusted) followed by the certificates;
* every other standard bundle the image has gains them too: ``/etc/pki/tls/certs/ca-bundle.crt``
  (Red Hat, Fedora, Amazon Linux), ``/etc/ssl/cert.pem``, ``/etc/ssl/ca-bundle.pem`` (SUSE);
* clients that ignore the system store are pointed at it: ``SSL_CERT_FILE`` (OpenSSL's default
  file, for images without OpenSSL's own configuration folder), ``AWS_CA_BUNDLE`` (botocore,
  boto3 and the AWS CLI use their own bundle otherwise), ``REQUESTS_CA_BUNDLE`` (requests uses
  certifi's otherwise) and ``NODE_EXTRA_CA_CERTS`` (Node.js, the AWS SDK for JavaScript) are
  set to ``/etc/ssl/certs/ca-certificates.crt``, unless the image sets them; a file the image
  names there gains the certificates as well.

Symbolic links are followed inside the image (``/etc/ssl/certs`` may be a link to
``/etc/pki/tls/certs``); a file is changed once however many names lead to it. The customer
ramdisk changes, so PCR0 and PCR2 change (PCR1, the kernel and bootstrap ramdisk, and PCR8,
the signing certificate, do not).
"""

from __future__ import annotations

import posixpath
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from harness.cpio import Entry
from harness.errors import ErrorCode, NitroError

#: The bundle every image ends up with (created when missing) and the variables point at.
MAIN_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
#: Other standard bundles, changed when the image has them, in the order a new main bundle is
#: seeded from.
OTHER_BUNDLES = ("etc/pki/tls/certs/ca-bundle.crt", "etc/ssl/cert.pem", "etc/ssl/ca-bundle.pem")
#: Variables that name a bundle for clients that do not read the system store.
CA_VARIABLES = ("SSL_CERT_FILE", "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
#: Symbolic links followed in one path at most (Linux's limit).
MAX_LINKS = 40

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class CaBundleChange:
    """What :func:`add_ca_bundle` did: ``entries`` and ``env`` of the image afterwards,
    ``appended`` (files that gained the certificates), ``created`` (files made), ``variables``
    (names set), all rootfs-relative paths or names, for the build's progress line."""

    entries: list[Entry]
    env: list[str]
    appended: list[str]
    created: list[str]
    variables: list[str]


def read_ca_pem(path: Path | str) -> bytes:
    """The PEM certificates of ``path``, each checked to parse as X.509, joined by newlines.

    Raises NitroError E19 when the file cannot be read, E48 when it holds no certificate or
    one that does not parse.
    """
    from cryptography import x509

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise NitroError(ErrorCode.FileOperationFailure,
                         f"--ca-bundle {path}: cannot read ({err.strerror or err})") from None
    blocks = _PEM_BLOCK.findall(raw)
    if not blocks:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"--ca-bundle {path}: no PEM certificate (-----BEGIN CERTIFICATE-----)")
    for number, block in enumerate(blocks, 1):
        try:
            x509.load_pem_x509_certificate(block)
        except ValueError as err:
            raise NitroError(ErrorCode.EifBuildingError,
                             f"--ca-bundle {path}: certificate {number} does not parse ({err})") from None
    return b"\n".join(b.replace(b"\r\n", b"\n") for b in blocks) + b"\n"


def _content(entry: Entry) -> bytes:
    return entry.source.read_bytes() if entry.source is not None else entry.data


def resolve_in_image(by_name: dict[str, Entry], path: str) -> str:
    """``path`` (absolute or rootfs-relative) with every symbolic link of the image followed,
    as a rootfs-relative name (which may not exist). Raises NitroError E48 after
    :data:`MAX_LINKS` links (a loop)."""
    pending = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        entry = by_name.get("/".join(done + [part]))
        if entry is not None and stat.S_ISLNK(entry.mode):
            links += 1
            if links > MAX_LINKS:
                raise NitroError(ErrorCode.EifBuildingError,
                                 f"--ca-bundle: /{path.lstrip('/')}: too many symbolic links in the image")
            target = entry.data.decode("utf-8", "surrogateescape")
            if target.startswith("/"):
                done = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        done.append(part)
    return "/".join(done)


def _is_file(entry: Entry | None) -> bool:
    return entry is not None and stat.S_ISREG(entry.mode)


def add_ca_bundle(entries: Sequence[Entry], env: Sequence[str], ca_pem: bytes) -> CaBundleChange:
    """Add ``ca_pem`` (from :func:`read_ca_pem`) to the trust stores of an image's root
    filesystem (rootfs-relative ``entries``) and ``env`` (``KEY=VALUE``), by the rule of the
    module docstring. Returns a :class:`CaBundleChange`. Raises NitroError E48 when a bundle
    path is a directory or another non-file, or links loop.
    """
    by_name = {e.name: e for e in entries}
    env = list(env)
    appended: list[str] = []
    created: list[str] = []
    changed: set[str] = set()

    def append(path: str, *, create: bool) -> None:
        name = resolve_in_image(by_name, path)
        if name in changed:
            return
        entry = by_name.get(name)
        if entry is None:
            if not create:
                return
            seed = next((_content(by_name[n]) for n in (resolve_in_image(by_name, o) for o in OTHER_BUNDLES)
                         if _is_file(by_name.get(n))), b"")
            _make_parents(by_name, name)
            by_name[name] = Entry.file(name, _joined(seed, ca_pem), mode=0o644)
            created.append(name)
        elif _is_file(entry):
            by_name[name] = replace(entry, data=_joined(_content(entry), ca_pem), source=None)
            appended.append(name)
        else:
            raise NitroError(ErrorCode.EifBuildingError,
                             f"--ca-bundle: /{path}: the image has a non-file there (/{name})")
        changed.add(name)

    append(MAIN_BUNDLE, create=True)
    for other in OTHER_BUNDLES:
        append(other, create=False)
    names = {kv.split("=", 1)[0]: kv.split("=", 1)[1] for kv in env if "=" in kv}
    variables = []
    for var in CA_VARIABLES:
        given = names.get(var)
        if given:
            append(given, create=False)  # the image's own choice keeps working
        else:
            env.append(f"{var}=/{MAIN_BUNDLE}")
            variables.append(var)
    return CaBundleChange(list(by_name.values()), env, appended, created, variables)


def _joined(existing: bytes, ca_pem: bytes) -> bytes:
    if existing and not existing.endswith(b"\n"):
        existing += b"\n"
    return existing + ca_pem


def _make_parents(by_name: dict[str, Entry], name: str) -> None:
    """Directory entries (0755) for the missing ancestors of ``name``."""
    parent = posixpath.dirname(name)
    missing = []
    while parent and parent not in by_name:
        missing.append(parent)
        parent = posixpath.dirname(parent)
    if parent and not by_name[parent].is_dir:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"--ca-bundle: /{name}: /{parent} in the image is not a directory")
    for directory in reversed(missing):
        by_name[directory] = Entry.directory(directory, 0o755)


__all__ = ["CA_VARIABLES", "CaBundleChange", "MAIN_BUNDLE", "OTHER_BUNDLES", "add_ca_bundle",
           "read_ca_pem", "resolve_in_image"]
