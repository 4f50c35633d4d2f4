#!/usr/bin/env python3
"""Guest-side NSM helper for the ``python`` image: drives /dev/nsm through the PyPI package
``aws-nsm-interface`` (used unchanged) and prints results as one line of JSON on stdout.

Runs inside the enclave (python3.11, python3-cbor2 5.4.6, python3-cryptography 38,
aws-nsm-interface 1.0.0 with its dependency ioctl-opt). Uses nothing newer than those.

Commands (each prints ONE line: ``[MARKER ]{json}``; bytes are hex, documents base64):

  describe                      DescribeNSM
  describe-pcr N                DescribePCR            -> {"index", "lock", "data"}
  extend-pcr N HEX              ExtendPCR              -> {"index", "data", "expected"}
  lock-pcr N / lock-pcrs N      LockPCR / LockPCRs     -> {"ok": true} or {"error": name}
  random [N]                    GetRandom (N <= 256)   -> {"random"}
  attest [--nonce HEX] [--user-data HEX] [--public-key FILE|HEX | --gen-rsa [--private-key-out F]]
                                Attestation            -> {"document": base64, "pcrs": {...}, ...}
  selfcheck                     AWS nsm-check style state machine (locks every PCR: run last)
  bench --count N [--kind attestation|random|describe]
                                N sequential requests: latency p50/p99/min/max (µs) and rate
  all [attest options]          describe, describe-pcr 0-4, 8 and 16, random, attest, then
                                selfcheck, in one JSON object (one boot, one line)

``--marker TEXT`` (before the command) prefixes the line so a host reading a console mixed with
kernel messages can find it. Exit status 0 when the command ran (NSM errors are reported in the
JSON), 2 on usage errors, 1 when /dev/nsm cannot be opened.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time

import aws_nsm_interface as nsm
import cbor2


def _hex(data):
    return None if data is None else bytes(data).hex()


def _error(err: Exception) -> dict:
    # aws-nsm-interface raises IoctlError(<NSM error name>) for {"Error": name}; GetRandom's
    # error path surfaces as AttributeError inside the package.
    name = err.args[0] if err.args and isinstance(err.args[0], str) else repr(err)
    return {"error": name, "exception": type(err).__name__}


def describe(fh) -> dict:
    out = dict(nsm.describe_nsm(fh))
    return out


def describe_pcr(fh, index: int) -> dict:
    try:
        resp = nsm.describe_pcr(fh, index)
    except Exception as err:  # noqa: BLE001 - reported as data
        return {"index": index, **_error(err)}
    return {"index": index, "lock": resp["lock"], "data": _hex(resp["data"])}


def extend_pcr(fh, index: int, data: bytes) -> dict:
    before = None
    try:
        before = nsm.describe_pcr(fh, index)["data"]
    except Exception:  # noqa: BLE001 - index may be invalid; the extend reports the error
        pass
    try:
        resp = nsm.extend_pcr(fh, index, data)
    except Exception as err:  # noqa: BLE001
        return {"index": index, **_error(err)}
    expected = hashlib.sha384(bytes(before) + data).hexdigest() if before is not None else None
    return {"index": index, "data": _hex(resp["data"]), "expected": expected}


def lock_pcr(fh, index: int) -> dict:
    try:
        nsm.lock_pcr(fh, index)
    except Exception as err:  # noqa: BLE001
        return {"index": index, **_error(err)}
    return {"index": index, "ok": True}


def lock_pcrs(fh, count: int) -> dict:
    try:
        nsm.lock_pcrs(fh, count)
    except Exception as err:  # noqa: BLE001
        return {"range": count, **_error(err)}
    return {"range": count, "ok": True}


def get_random(fh, length: int = 256) -> dict:
    try:
        data = nsm.get_random(fh, length)
    except Exception as err:  # noqa: BLE001
        return _error(err)
    return {"random": _hex(data), "length": len(data)}


def _rsa_public_key(private_key_out: str | None) -> bytes:
    # cryptography 38: rsa.generate_private_key(public_exponent, key_size) and the
    # serialization enums below all exist there.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if private_key_out:
        with open(private_key_out, "wb") as handle:
            handle.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def attest(fh, nonce=None, user_data=None, public_key=None) -> dict:
    start = time.perf_counter_ns()
    try:
        resp = nsm.get_attestation_doc(fh, user_data=user_data, nonce=nonce, public_key=public_key)
    except Exception as err:  # noqa: BLE001
        return _error(err)
    elapsed_us = (time.perf_counter_ns() - start) / 1000
    document = bytes(resp["document"])
    out = {"document": base64.b64encode(document).decode("ascii"), "size": len(document), "latency_us": elapsed_us}
    # Decode what the guest can see without verifying (the host verifies).
    try:
        cose = cbor2.loads(document)
        if isinstance(cose, cbor2.CBORTag):
            cose = cose.value
        payload = cbor2.loads(cose[2])
        out["module_id"] = payload["module_id"]
        out["timestamp"] = payload["timestamp"]
        out["pcrs"] = {str(k): _hex(v) for k, v in sorted(payload["pcrs"].items())}
        out["nonce"] = _hex(payload["nonce"])
        out["user_data"] = _hex(payload["user_data"])
        out["public_key"] = _hex(payload["public_key"])
    except Exception as err:  # noqa: BLE001
        out["decode_error"] = repr(err)
    return out


def selfcheck(fh) -> dict:
    """The checks of AWS's nsm-check, as pass/fail booleans plus the first failure's detail."""
    checks: dict[str, bool] = {}
    detail: list[str] = []

    def check(name: str, ok: bool, why: str = "") -> None:
        checks[name] = bool(ok)
        if not ok and why:
            detail.append(f"{name}: {why}")

    info = nsm.describe_nsm(fh)
    check("describe.max_pcrs_32", info.get("max_pcrs") == 32, repr(info.get("max_pcrs")))
    check("describe.locked_0_15", list(info.get("locked_pcrs", [])) == list(range(16)), repr(info.get("locked_pcrs")))
    check("describe.digest_sha384", info.get("digest") == "SHA384", repr(info.get("digest")))
    locked_ok = extend_fails = lock_fails = True
    for index in range(16):
        desc = nsm.describe_pcr(fh, index)
        locked_ok &= desc["lock"] is True and len(desc["data"]) == 48
        extend_fails &= "error" in extend_pcr(fh, index, b"x")
        lock_fails &= "error" in lock_pcr(fh, index)
    check("pcr0_15.locked", locked_ok)
    check("pcr0_15.extend_fails", extend_fails)
    check("pcr0_15.lock_fails", lock_fails)
    zero_ok = extend_ok = relock_ok = True
    for index in range(16, 32):
        desc = nsm.describe_pcr(fh, index)
        zero_ok &= desc["lock"] is False and bytes(desc["data"]) == bytes(48)
        value = bytes(48)
        for chunk in (b"nitro", bytes(range(64))):
            value = hashlib.sha384(value + chunk).digest()
            resp = nsm.extend_pcr(fh, index, chunk)
            extend_ok &= bytes(resp["data"]) == value
        relock_ok &= lock_pcr(fh, index).get("ok") is True and "error" in extend_pcr(fh, index, b"y")
    check("pcr16_31.start_zero_unlocked", zero_ok)  # fresh state: run selfcheck before extending
    check("pcr16_31.extend_returns_new_value", extend_ok)
    check("pcr16_31.lock_then_extend_fails", relock_ok)
    check("lock_pcrs_32_ok", lock_pcrs(fh, 32).get("ok") is True)
    check("lock_pcrs_33_fails", "error" in lock_pcrs(fh, 33))
    check("describe_pcr_32_fails", "error" in describe_pcr(fh, 32))
    rnd = get_random(fh, 256)
    check("get_random_256", rnd.get("length") == 256, repr(rnd))
    return {"passed": all(checks.values()), "checks": checks, "failures": detail}


def bench(fh, count: int, kind: str) -> dict:
    calls = {
        "attestation": lambda: nsm.get_attestation_doc(fh, nonce=b"\x01" * 32),
        "random": lambda: nsm.get_random(fh, 256),
        "describe": lambda: nsm.describe_nsm(fh),
    }
    call = calls[kind]
    call()  # warm-up (first leaf issue, imports)
    samples = []
    total_start = time.perf_counter_ns()
    for _ in range(count):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1000)
    total_s = (time.perf_counter_ns() - total_start) / 1e9
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(round(p / 100 * (len(samples) - 1))))]

    return {
        "kind": kind,
        "count": count,
        "p50_us": pct(50),
        "p99_us": pct(99),
        "min_us": samples[0],
        "max_us": samples[-1],
        "mean_us": sum(samples) / len(samples),
        "per_second": count / total_s if total_s else None,
    }


def _attest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nonce")
    p.add_argument("--user-data")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--public-key", help="file whose bytes go into public_key, or hex if no such file")
    key.add_argument("--gen-rsa", action="store_true", help="generate RSA-2048, send its DER SPKI")
    p.add_argument("--private-key-out", help="with --gen-rsa: write the private key (PEM) here")


def _attest_inputs(args) -> tuple[bytes | None, bytes | None, bytes | None]:
    nonce = bytes.fromhex(args.nonce) if args.nonce else None
    user_data = bytes.fromhex(args.user_data) if args.user_data else None
    public_key = None
    if args.public_key:
        try:
            with open(args.public_key, "rb") as handle:
                public_key = handle.read()
        except FileNotFoundError:
            public_key = bytes.fromhex(args.public_key)  # scenarios may pass the bytes inline
    elif args.gen_rsa:
        public_key = _rsa_public_key(args.private_key_out)
    return nonce, user_data, public_key



def open_device():
    """Open /dev/nsm for the package's calls; returns (handle, how it was opened).

    aws-nsm-interface opens the device with ``open(path, 'r+')``, a buffered text file that
    Python only creates on a seekable file. The upstream Linux nsm driver (6.8+, the one AWS's
    own current enclave kernels carry) has no llseek, and since Linux 6.0 such a device is not
    seekable, so that call fails with "File or stream is not seekable" there. Every NSM call
    of the package only needs the file descriptor, so the fallback opens it unbuffered.
    """
    try:
        return nsm.open_nsm_device(), "aws_nsm_interface.open_nsm_device"
    except OSError as err:  # io.UnsupportedOperation is an OSError
        return open(nsm.NSM_DEV_FILE, "r+b", buffering=0), f"raw open ({err})"

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsm_tool", description=__doc__.splitlines()[0])
    parser.add_argument("--marker", default="", help="prefix for the output line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("describe")
    p = sub.add_parser("describe-pcr")
    p.add_argument("index", type=int)
    p = sub.add_parser("extend-pcr")
    p.add_argument("index", type=int)
    p.add_argument("data")
    p = sub.add_parser("lock-pcr")
    p.add_argument("index", type=int)
    p = sub.add_parser("lock-pcrs")
    p.add_argument("range", type=int)
    p = sub.add_parser("random")
    p.add_argument("length", type=int, nargs="?", default=256)
    _attest_args(sub.add_parser("attest"))
    sub.add_parser("selfcheck")
    p = sub.add_parser("bench")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--kind", choices=("attestation", "random", "describe"), default="attestation")
    _attest_args(sub.add_parser("all"))
    args = parser.parse_args(argv)

    try:
        fh, opened = open_device()
    except OSError as err:
        sys.stdout.write((args.marker + " " if args.marker else "") + json.dumps({"error": f"open /dev/nsm: {err}"}) + "\n")
        return 1
    try:
        if args.command == "describe":
            result = describe(fh)
        elif args.command == "describe-pcr":
            result = describe_pcr(fh, args.index)
        elif args.command == "extend-pcr":
            result = extend_pcr(fh, args.index, bytes.fromhex(args.data))
        elif args.command == "lock-pcr":
            result = lock_pcr(fh, args.index)
        elif args.command == "lock-pcrs":
            result = lock_pcrs(fh, args.range)
        elif args.command == "random":
            result = get_random(fh, args.length)
        elif args.command == "attest":
            result = attest(fh, *_attest_inputs(args))
        elif args.command == "selfcheck":
            result = selfcheck(fh)
        elif args.command == "bench":
            result = bench(fh, args.count, args.kind)
        else:  # all
            nonce, user_data, public_key = _attest_inputs(args)
            result = {
                "describe": describe(fh),
                "describe_pcr": {str(i): describe_pcr(fh, i) for i in (0, 1, 2, 3, 4, 8, 16)},
                "random": get_random(fh, 256),
                "attest": attest(fh, nonce, user_data, public_key),
                # Last: it extends and locks PCRs 16-31 (its extends are checked inside).
                "selfcheck": selfcheck(fh),
                "device_open": opened,
            }
    finally:
        nsm.close_nsm_device(fh)
    sys.stdout.write((args.marker + " " if args.marker else "") + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
