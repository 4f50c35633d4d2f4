"""nitro-cli's image commands: build-enclave, describe-eif, pcr, sign-eif (docs/nitro-cli.md).

JSON on stdout with nitro-cli's field names and order (2-space indent), progress on stderr,
exit status = the error number (E35 EifParsingError, E48 EifBuildingError, E52
BlobsPathNotSet, E59/E60 signature checking/signing, E49/E50 Docker build/pull).

Harness extensions beyond nitro-cli's flags: ``build-enclave --docker-archive FILE`` and
``--rootfs DIR --cmd ... --env K=V`` (no Docker engine needed), ``--ca-bundle PEM`` (the
image trusts those CAs: :mod:`harness.images.ca_bundle`), ``--blobs DIR`` (wins over
``NITRO_CLI_BLOBS``; with no blobs anywhere the harness's own are used), ``--module KO`` (extra modules loaded by init before the heartbeat),
``SOURCE_DATE_EPOCH`` pins BuildTime for byte-identical builds; ``sign-eif --output-file``
writes a signed copy instead of signing in place; ``describe-eif`` warns on stderr where
nitro-cli's sequential reader would read the file differently from the hypervisor.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from harness import eif as eifmod
from harness.arch import from_eif_flags
from harness.cli import print_json, progress
from harness.errors import ErrorCode, NitroError
from harness.pcr import Measurements, ext, pcr_for_certificate_der

#: docs/eif-format.md#metadata: the custom metadata file may be at most 4096 bytes.
MAX_CUSTOM_METADATA = 4096


def register(subparsers) -> None:
    """Add build-enclave, describe-eif, pcr and sign-eif."""
    b = subparsers.add_parser("build-enclave", help="build an EIF from a docker archive or a "
                                                    "root filesystem directory")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--docker-uri", help="image in a local Docker engine (needs one reachable)")
    b.add_argument("--docker-dir", type=Path,
                   help="directory with a Dockerfile to build as --docker-uri (needs Docker)")
    src.add_argument("--docker-archive", type=Path,
                     help="`docker save` or OCI image-layout tarball")
    src.add_argument("--rootfs", type=Path, help="root filesystem directory (with --cmd/--env)")
    b.add_argument("--cmd", help="command for --rootfs: a JSON array or a shell-quoted string")
    b.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for --rootfs (repeatable)")
    b.add_argument("--output-file", required=True, type=Path)
    b.add_argument("--name", help="image name in the metadata (default: the source's name)")
    b.add_argument("--version", dest="image_version", help="image version (default 1.0)")
    b.add_argument("--metadata", type=Path, help="JSON object file, at most 4096 bytes")
    b.add_argument("--signing-certificate", type=Path)
    b.add_argument("--private-key", type=Path)
    b.add_argument("--blobs", type=Path, help="blob directory (default: $NITRO_CLI_BLOBS)")
    b.add_argument("--module", action="append", default=[], type=Path, metavar="KO",
                   help="extra kernel module for the bootstrap ramdisk (harness extension)")
    b.add_argument("--ca-bundle", type=Path, metavar="PEM",
                   help="CA certificate(s) the image must trust, added to its standard trust "
                        "stores and CA variables (harness extension; changes PCR0 and PCR2)")
    b.set_defaults(func=build_enclave)

    d = subparsers.add_parser("describe-eif", help="print an EIF's measurements and metadata")
    d.add_argument("--eif-path", required=True, type=Path)
    d.set_defaults(func=describe_eif)

    p = subparsers.add_parser("pcr", help="print the PCR of a file or of a signing certificate")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--input", type=Path)
    which.add_argument("--signing-certificate", type=Path)
    p.set_defaults(func=pcr_cmd)

    s = subparsers.add_parser("sign-eif", help="sign (or re-sign) an EIF with an EC key")
    s.add_argument("--eif-path", required=True, type=Path)
    s.add_argument("--signing-certificate", required=True, type=Path)
    s.add_argument("--private-key", required=True, type=Path)
    s.add_argument("--output-file", type=Path,
                   help="write the signed EIF here instead of in place (harness extension)")
    s.set_defaults(func=sign_eif_cmd)


# --- describe-eif ------------------------------------------------------------------------


def _certificate_info(cert: Any) -> dict:
    """nitro-cli's SigningCertificate object: IssuerName (sorted long names), Algorithm,
    NotBefore/NotAfter in OpenSSL's ``ASN1_TIME_print`` form, Signature as XX:XX:..."""
    issuer = {}
    for attr in cert.issuer:
        issuer[attr.oid._name] = attr.value if isinstance(attr.value, str) else repr(attr.value)
    oid = cert.signature_algorithm_oid
    algo = {"1.2.840.10045.4.3.2": "ecdsa-with-SHA256", "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
            "1.2.840.10045.4.3.4": "ecdsa-with-SHA512"}.get(oid.dotted_string, oid._name)

    def asn1_time(t: _dt.datetime) -> str:
        return f"{t:%b} {t.day:2d} {t:%H:%M:%S %Y} GMT"

    return {
        "IssuerName": dict(sorted(issuer.items())),
        "Algorithm": algo,
        "NotBefore": asn1_time(cert.not_valid_before_utc),
        "NotAfter": asn1_time(cert.not_valid_after_utc),
        "Signature": ":".join(f"{b:02X}" for b in cert.signature),
    }


def describe(path: Path) -> dict:
    """Return describe-eif's document for ``path`` (one streaming read for PCRs and CRC).

    Field order as nitro-cli: EifVersion, Measurements, IsSigned, SigningCertificate (signed
    only), CheckCRC, SignatureCheck (signed only), ImageName, ImageVersion, Metadata (when the
    EIF has metadata; custom metadata keys are merged into Metadata as nitro-cli flattens
    them), then the harness's ``Arch`` (``x86_64`` or ``aarch64``, from the header's flags:
    docs/eif-format.md#header; nitro-cli prints no such field, so it comes last, where
    scripts reading nitro-cli's fields do not meet it). Raises ``NitroError(E35)`` for an
    invalid EIF.
    """
    m, eif = eifmod.measure_and_check(path, with_crc=True)
    for note in eif.sequential_notes:
        # nitro-cli has no field for these; the hypervisor's view (the table) is reported.
        progress(f"warning: {path}: {note}")
    doc: dict[str, Any] = {"EifVersion": eif.version, "Measurements": m.to_json(),
                           "IsSigned": eif.is_signed}
    check = None
    if eif.is_signed:
        check = eifmod.verify_eif_signature(path, measurements=m)
        if check.certificate is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # malformed names warn before failing
                    doc["SigningCertificate"] = _certificate_info(check.certificate)
            except Exception as e:  # noqa: BLE001 - cryptography decodes lazily, raising
                # ValueError, KeyError, ... on malformed fields; one line for the user.
                raise NitroError(ErrorCode.EifParsingError,
                                 f"{path}: signature.signing_certificate: cannot be decoded "
                                 f"({e})") from None
    doc["CheckCRC"] = bool(eif.crc_ok)
    if check is not None:
        doc["SignatureCheck"] = check.ok
    meta = eif.metadata
    if meta is not None:
        doc["ImageName"] = meta.get("ImageName")
        doc["ImageVersion"] = meta.get("ImageVersion")
        bm = meta.get("BuildMetadata") or {}
        if not isinstance(bm, dict):
            # nitro-cli reads BuildMetadata into a struct and fails on anything else.
            raise NitroError(ErrorCode.EifParsingError,
                             f"{path}: metadata.BuildMetadata: must be a JSON object")
        md = {k: bm.get(k) for k in ("BuildTime", "BuildTool", "BuildToolVersion",
                                     "OperatingSystem", "KernelVersion")}
        md["DockerInfo"] = meta.get("DockerInfo")
        custom = meta.get("CustomMetadata")
        if isinstance(custom, dict):
            md.update(custom)
        doc["Metadata"] = md
    doc["Arch"] = from_eif_flags(eif.header.flags).name
    return doc


def describe_eif(args) -> int:
    """``describe-eif --eif-path F``: print describe()'s document; notes go to stderr."""
    doc = describe(args.eif_path)
    print_json(doc)
    return 0


# --- pcr ---------------------------------------------------------------------------------


def pcr_cmd(args) -> int:
    """``pcr --input F`` prints {"PCR": ext(SHA384(F))}; ``--signing-certificate C`` prints
    {"PCR8": ext(SHA384(DER))} (docs/pcrs.md#pcr8). Missing file: E19."""
    if args.input is not None:
        h = hashlib.sha384()
        try:
            with open(args.input, "rb") as f:
                while b := f.read(eifmod.CHUNK_SIZE):
                    h.update(b)
        except OSError as e:
            raise NitroError(ErrorCode.FileOperationFailure,
                             f"{args.input}: open: {e.strerror or e}") from None
        print_json({"PCR": ext(h.digest()).hex()})
        return 0
    try:
        pem = args.signing_certificate.read_bytes()
    except OSError as e:
        raise NitroError(ErrorCode.FileOperationFailure,
                         f"{args.signing_certificate}: open: {e.strerror or e}") from None
    try:
        der = eifmod._first_cert_der(args.signing_certificate, pem)
    except NitroError as e:
        raise NitroError(ErrorCode.InvalidArgument, e.message) from None
    print_json({"PCR8": pcr_for_certificate_der(der).hex()})
    return 0


# --- sign-eif ----------------------------------------------------------------------------


def sign_eif_cmd(args) -> int:
    """``sign-eif``: sign (or re-sign) in place, or into ``--output-file``; print Measurements."""
    out = args.output_file or args.eif_path
    progress("Start signing the Enclave Image...")
    m = eifmod.sign_eif(args.eif_path, out, args.signing_certificate, args.private_key)
    progress("Enclave Image successfully signed.")
    print_json({"Measurements": m.to_json()})
    return 0


# --- build-enclave -----------------------------------------------------------------------


def _load_custom_metadata(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NitroError(ErrorCode.FileOperationFailure,
                         f"{path}: open: {e.strerror or e}") from None
    if len(raw) > MAX_CUSTOM_METADATA:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{path}: metadata: {len(raw)} bytes exceeds {MAX_CUSTOM_METADATA}")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{path}: metadata: not valid JSON ({e.msg if hasattr(e, 'msg') else e})"
                         ) from None
    if not isinstance(obj, dict):
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{path}: metadata: must be a JSON object, not {type(obj).__name__}")
    return obj


def _parse_cmd(text: str | None) -> list[str]:
    if text is None:
        return []
    t = text.strip()
    if t.startswith("["):
        try:
            v = json.loads(t)
        except json.JSONDecodeError as e:
            raise NitroError(ErrorCode.InvalidArgument, f"--cmd: not a JSON array ({e.msg})") from None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise NitroError(ErrorCode.InvalidArgument, "--cmd: JSON must be an array of strings")
        return v
    try:
        return shlex.split(t)
    except ValueError as e:
        raise NitroError(ErrorCode.InvalidArgument, f"--cmd: {e}") from None


def _docker_engine_socket() -> str | None:
    """Return the Docker engine's Unix socket path if one answers a connect, else None."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return None
    sock_path = host[len("unix://"):]
    import socket  # build-enclave only: describe-eif's start-up stays lean

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(sock_path)
        return sock_path
    except OSError:
        return None
    finally:
        s.close()


def _save_docker_uri(uri: str, dest: Path, docker_dir: Path | None = None) -> Path:
    """``docker save`` ``uri`` (built first from ``docker_dir`` when given) into ``dest``.

    E50 DockerImagePullError (E49 DockerImageBuildError with ``docker_dir``) when no engine or
    no docker client is usable, naming the alternative (--docker-archive).
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    code = ErrorCode.DockerImageBuildError if docker_dir else ErrorCode.DockerImagePullError
    if _docker_engine_socket() is None:
        raise NitroError(code,
                         f"--docker-uri {uri}: no Docker engine reachable at {host}; save the "
                         "image elsewhere (`docker save IMAGE -o img.tar`) and pass "
                         "--docker-archive img.tar")
    import subprocess

    docker = shutil.which("docker")
    if docker is None:
        raise NitroError(code,
                         f"--docker-uri {uri}: a Docker engine answers at {host} but no `docker` "
                         "client is on PATH; use --docker-archive")
    if docker_dir is not None:
        r = subprocess.run([docker, "build", "-t", uri, str(docker_dir)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise NitroError(code, f"--docker-dir {docker_dir}: docker build: {last}")
    out = dest / "image.tar"
    r = subprocess.run([docker, "save", "-o", str(out), uri], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise NitroError(ErrorCode.DockerImagePullError, f"--docker-uri {uri}: docker save: {last}")
    return out


def _build_time() -> str:
    """RFC 3339 build time; ``SOURCE_DATE_EPOCH`` pins it for fully reproducible builds."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde and sde.isdigit():
        t = _dt.datetime.fromtimestamp(int(sde), _dt.timezone.utc)
    else:
        t = _dt.datetime.now(_dt.timezone.utc)
    return t.isoformat()


def _blobs(blobs_dir: Path | None):
    """nitro-cli's blobs (``--blobs``, ``NITRO_CLI_BLOBS``, the default folder), else the
    harness's own, saying so on stderr with the kernel's version and path (docs/boot.md#blobs)."""
    from harness.images.blobs import blobs_source, find_blobs

    if blobs_source(blobs_dir) is not None:
        return find_blobs(blobs_dir)
    from harness.images.own_blobs import harness_blobs

    blobs = harness_blobs(progress)
    progress(f"No nitro-cli blobs (--blobs, NITRO_CLI_BLOBS, /usr/share/nitro_enclaves/blobs): "
             f"using the harness's own kernel {eifmod.kernel_version_of(blobs.kernel) or 'unknown'} "
             f"({blobs.kernel.resolve()}), its cmdline, init and nsm.ko")
    return blobs


def _add_ca_bundle(rootfs: Any, env: list[str], ca_pem: bytes, source: Path) -> tuple[list, list[str]]:
    """The root filesystem (a directory or entries) and env with ``ca_pem`` added to the
    image's trust stores (harness.images.ca_bundle, docs/nitro-cli.md#build-enclave); says on
    stderr which files and variables changed. Raises NitroError E48."""
    from harness.cpio import CpioError, entries_from_directory
    from harness.images.ca_bundle import add_ca_bundle

    if isinstance(rootfs, Path):
        try:
            rootfs = entries_from_directory(rootfs, keep_owner=True)
        except (CpioError, OSError) as e:
            raise NitroError(ErrorCode.EifBuildingError, f"{rootfs}: rootfs: {e}") from None
    change = add_ca_bundle(rootfs, env, ca_pem)
    files = [f"/{n} (appended)" for n in change.appended] + [f"/{n} (created)" for n in change.created]
    progress(f"--ca-bundle {source}: added to {', '.join(files)}"
             + (f"; set {', '.join(change.variables)}" if change.variables else ""))
    return change.entries, change.env


def build_enclave(args) -> int:
    """``build-enclave``: blobs + application -> EIF; prints {"Measurements": ...} (docs/nitro-cli.md#build-enclave).

    Sources: ``--docker-archive`` (docker save / OCI tarball), ``--rootfs DIR`` with
    ``--cmd``/``--env``, or ``--docker-uri`` (needs a reachable Docker engine, else E50).
    ``--ca-bundle`` adds CA certificates to the image's trust stores (changing PCR0 and PCR2).
    Checks everything (blobs, metadata file, key) before writing; the output appears
    atomically. Errors: E01/E02 arguments, E48 building, E52 blobs, E60 signing key.
    """
    from harness.images.ramdisk import build_bootstrap_ramdisk, build_customer_ramdisk

    if not (args.docker_uri or args.docker_archive or args.rootfs):
        raise NitroError(ErrorCode.MissingArgument,
                         "build-enclave: one of --docker-uri, --docker-archive or --rootfs is "
                         "required")
    if args.docker_dir and not args.docker_uri:
        raise NitroError(ErrorCode.MissingArgument,
                         "build-enclave: --docker-dir needs --docker-uri (the tag to build)")
    if (args.cmd or args.env) and not args.rootfs:
        raise NitroError(ErrorCode.ConflictingArgument,
                         "build-enclave: --cmd/--env go with --rootfs (images carry their own)")
    if bool(args.signing_certificate) != bool(args.private_key):
        raise NitroError(ErrorCode.MissingArgument,
                         "build-enclave: --signing-certificate and --private-key go together")
    progress("Start building the Enclave Image...")
    ca_pem = None
    if args.ca_bundle:
        from harness.images.ca_bundle import read_ca_pem

        ca_pem = read_ca_pem(args.ca_bundle)
    blobs = _blobs(args.blobs)
    custom = _load_custom_metadata(args.metadata) if args.metadata else None
    signer = None
    if args.signing_certificate:
        signer = eifmod.Signer.from_files(args.signing_certificate, args.private_key)
        signer._load(str(args.private_key))
    out = args.output_file
    if not out.parent.is_dir():
        raise NitroError(ErrorCode.FileOperationFailure,
                         f"{out}: output directory {out.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix=".nitro-build-", dir=out.parent) as tmps:
        tmp = Path(tmps)
        docker_info = None
        if args.rootfs:
            name = args.name or args.rootfs.resolve().name
            cmd, env = _parse_cmd(args.cmd), list(args.env)
            rootfs: Any = args.rootfs
        else:
            from harness.images.docker_archive import load_docker_archive

            archive_path = args.docker_archive
            if args.docker_uri:
                archive_path = _save_docker_uri(args.docker_uri, tmp, args.docker_dir)
            progress(f"Using the image archive {archive_path}...")
            archive, rootfs = load_docker_archive(archive_path, tmp / "files")
            cmd, env = archive.cmd, archive.env
            docker_info = archive.docker_info()
            name = args.name or args.docker_uri or (archive.repo_tags[0] if archive.repo_tags
                                                    else archive_path.name)
        if ca_pem is not None:
            rootfs, env = _add_ca_bundle(rootfs, env, ca_pem, args.ca_bundle)
        boot = build_bootstrap_ramdisk(tmp / "bootstrap.cpio", blobs.init, blobs.nsm_ko,
                                       list(args.module))
        cust = build_customer_ramdisk(tmp / "customer.cpio", rootfs, cmd, env)
        metadata = eifmod.build_metadata(
            image_name=name, image_version=args.image_version or "1.0",
            build_time=_build_time(), kernel_version=blobs.kernel_version(),
            docker_info=docker_info, custom_metadata=custom)
        m = eifmod.write_eif(out, blobs.kernel, blobs.cmdline, [boot, cust], metadata, signer,
                             aarch64=blobs.aarch64)
    progress("Enclave Image successfully created.")
    print_json({"Measurements": m.to_json()})
    return 0


__all__ = ["register", "describe", "build_enclave", "describe_eif", "pcr_cmd", "sign_eif_cmd",
           "Measurements"]
