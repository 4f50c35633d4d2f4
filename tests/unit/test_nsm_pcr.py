"""nsm-pcr (harness/data/programs/nsm-pcr): the static DescribePCR tool of the busybox images.

No boot and no image here (tests/boot/test_nsm_pcr_images.py checks the hello images carry it;
tests/boot/test_qemu_cross_check.py boots hello and reads its lines on QEMU's NSM): the build
is static and reproducible, and its request encoding and response decoding are checked on the
host by linking nsm-pcr.c with a stand-in ``ioctl`` that records the request and returns a
canned response (encoded here with cbor2, an implementation independent of the tool's decoder).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import cbor2
import pytest

from harness.errors import ErrorCode, NitroError
from harness.images import debian, recipes

PT_DYNAMIC, PT_INTERP = 2, 3
# include/uapi/linux/nsm.h: _IOWR(0x0A, 0x0, struct nsm_raw), a 32-byte struct.
NSM_IOCTL_RAW = (3 << 30) | (32 << 16) | (0x0A << 8) | 0x00

PCR = bytes(range(48))

# Links in place of libc's ioctl (a definition in the executable wins over libc.so's): logs
# "<request number> <request hex>" to $NSM_PCR_TEST_REQUESTS and answers $NSM_PCR_TEST_RESPONSE
# (hex) the way the driver does, setting response.len to the answer's length.
IOCTL_SHIM = r"""
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/types.h>

struct nsm_iovec { __u64 addr; __u64 len; };
struct nsm_raw { struct nsm_iovec request; struct nsm_iovec response; };

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    struct nsm_raw *raw = va_arg(ap, struct nsm_raw *);
    va_end(ap);
    (void)fd;
    const char *log = getenv("NSM_PCR_TEST_REQUESTS");
    if (log) {
        FILE *f = fopen(log, "a");
        const unsigned char *req = (const unsigned char *)(unsigned long)raw->request.addr;
        fprintf(f, "%lx ", request);
        for (__u64 i = 0; i < raw->request.len; i++)
            fprintf(f, "%02x", req[i]);
        fputc('\n', f);
        fclose(f);
    }
    const char *hex = getenv("NSM_PCR_TEST_RESPONSE");
    if (!hex) {
        errno = ENOTTY;
        return -1;
    }
    size_t n = strlen(hex) / 2;
    if (n > raw->response.len) {
        errno = EMSGSIZE;
        return -1;
    }
    unsigned char *out = (unsigned char *)(unsigned long)raw->response.addr;
    for (size_t i = 0; i < n; i++)
        sscanf(hex + 2 * i, "%2hhx", &out[i]);
    raw->response.len = n;
    return 0;
}
"""


def _program_header_types(path: Path) -> list[int]:
    """p_type of every program header of a little-endian ELF64 x86-64 file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a little-endian ELF64"
    assert struct.unpack_from("<H", data, 18)[0] == 62  # EM_X86_64
    e_phoff = struct.unpack_from("<Q", data, 32)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    return [struct.unpack_from("<I", data, e_phoff + i * e_phentsize)[0] for i in range(e_phnum)]


# --- build and images ------------------------------------------------------------------------


def test_nsm_pcr_is_static_and_reproducible(tmp_path):
    built = recipes.build_static_program("nsm-pcr")
    assert built.name == "nsm-pcr" and os.access(built, os.X_OK)
    types = _program_header_types(built)
    assert types and PT_INTERP not in types and PT_DYNAMIC not in types
    assert recipes.elf_interpreter(built) is None
    # Same source and toolchain, another directory: the same bytes (so the same PCR2).
    out = tmp_path / "elsewhere" / "nsm-pcr"
    out.parent.mkdir()
    subprocess.run(["make", "-s", "-C", str(recipes.program_source_dir("nsm-pcr")), f"OUT={out}"],
                   check=True, capture_output=True)
    assert out.read_bytes() == built.read_bytes()
    # init shares the builder and keeps the cache location it always had.
    assert built.parent.parent == debian.cache_root() / "programs" / "nsm-pcr"
    assert recipes.build_init().parent.parent == debian.cache_root() / "init"


def test_programs_field_errors(tmp_path):
    base = "kernel: {package: linux-image-6.12-cloud-amd64}\n"
    cases = {
        "rootfs: {programs: {usr/bin/x: nsm-pcr}}\n": "rootfs.programs",
        "rootfs: {programs: {/usr/bin/x: ../init}}\n": "rootfs.programs./usr/bin/x",
        "rootfs: {programs: {/usr/bin/x: no-such-program}}\n": "rootfs.programs: /usr/bin/x",
        ("rootfs: {programs: {/usr/bin/x: nsm-pcr}, files: [{path: /usr/bin/x, content: a}]}\n"):
            "also listed in rootfs.files",
    }
    for body, field in cases.items():
        p = tmp_path / "bad.yaml"
        p.write_text(base + body)
        with pytest.raises(NitroError) as e:
            recipes.load_recipe(p)
        assert e.value.code == ErrorCode.EifBuildingError
        assert str(p) in e.value.message and field in e.value.message, (body, e.value.message)


# --- request encoding and response decoding, on the host ---------------------------------------


@pytest.fixture(scope="module")
def shimmed(tmp_path_factory) -> Path:
    """nsm-pcr.c linked with the stand-in ioctl, its device /dev/null (opens O_RDWR anywhere)."""
    work = tmp_path_factory.mktemp("nsm-pcr-shim")
    (work / "shim.c").write_text(IOCTL_SHIM)
    out = work / "nsm-pcr-shimmed"
    src = recipes.program_source_dir("nsm-pcr") / "nsm-pcr.c"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
                    '-DNSM_DEVICE="/dev/null"', "-o", str(out), str(src), str(work / "shim.c")],
                   check=True, capture_output=True)
    return out


def _run(binary: Path, tmp_path: Path, args: list[str], response: bytes | None):
    log = tmp_path / "requests"
    log.unlink(missing_ok=True)
    env = dict(os.environ, NSM_PCR_TEST_REQUESTS=str(log))
    env.pop("NSM_PCR_TEST_RESPONSE", None)
    if response is not None:
        env["NSM_PCR_TEST_RESPONSE"] = response.hex()
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env,
                          timeout=30)
    requests = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return proc, [(int(n, 16), bytes.fromhex(body)) for n, body in requests]


def _failed(proc) -> str:
    """The one stderr line of a failure (exit 1, nothing on stdout)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsm-pcr: "), proc.stderr
    return lines[0]


def test_request_encoding_and_ioctl(shimmed, tmp_path):
    indexes = [0, 1, 23, 24, 255, 256, 65535]
    response = cbor2.dumps({"DescribePCR": {"lock": True, "data": PCR}})
    proc, requests = _run(shimmed, tmp_path, [str(i) for i in indexes], response)
    assert proc.returncode == 0, proc.stderr
    assert [n for n, _ in requests] == [NSM_IOCTL_RAW] * len(indexes)
    # serde_cbor's encoding of Request::DescribePCR { index }: shortest-form integers.
    assert [body for _, body in requests] == [
        cbor2.dumps({"DescribePCR": {"index": i}}) for i in indexes]
    assert [json.loads(line)["index"] for line in proc.stdout.splitlines()] == indexes


@pytest.mark.parametrize("inner, lock", [
    ({"lock": True, "data": PCR}, "true"),
    ({"data": PCR, "lock": False}, "false"),  # key order does not matter
    ({"lock": True, "future": [1, {"a": b"x", "b": -5}], "data": PCR}, "true"),  # unknown key
])
def test_describe_pcr_line(shimmed, tmp_path, inner, lock):
    proc, _ = _run(shimmed, tmp_path, ["4"], cbor2.dumps({"DescribePCR": inner}))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    line = f'{{"index": 4, "lock": {lock}, "data": "{PCR.hex()}"}}\n'
    assert proc.stdout == line
    # The exact text nsm_tool.py describe-pcr prints (json.dumps of the same dict).
    assert proc.stdout == json.dumps({"index": 4, "lock": lock == "true", "data": PCR.hex()}) + "\n"


def test_nsm_error_response(shimmed, tmp_path):
    proc, _ = _run(shimmed, tmp_path, ["99", "0"], cbor2.dumps({"Error": "InvalidIndex"}))
    assert _failed(proc) == "nsm-pcr: DescribePCR 99: NSM error InvalidIndex"


GOOD = cbor2.dumps({"DescribePCR": {"lock": True, "data": PCR}})


@pytest.mark.parametrize("response", [
    b"",                                                        # empty
    GOOD[:-1],                                                  # truncated data
    GOOD + b"\x00",                                             # trailing byte
    GOOD[:1],                                                   # only the map's head
    cbor2.dumps({"DescribePCR": {"lock": True, "data": PCR.hex()}}),   # data as text
    cbor2.dumps({"DescribePCR": {"lock": 1, "data": PCR}}),            # lock as integer
    b"\xa1\x6bDescribePCR\xa2\x64lock\xf9\x00\x15\x64data\x40",         # lock a half float
    b"\xa1\x6bDescribePCR\xa2\x64lock\xf5\x64lock\xf4\x64data\x40",     # lock twice
    cbor2.dumps({"DescribePCR": {"data": PCR}}),                       # no lock
    cbor2.dumps({"DescribePCR": {"lock": True}}),                      # no data
    cbor2.dumps({"DescribePCR": {"lock": True, "data": bytes(65)}}),   # longer than SHA-512
    cbor2.dumps({"Attestation": {"document": b"x"}}),                  # another response
    cbor2.dumps({"DescribePCR": {"lock": True, "data": PCR}, "Error": "x"}),  # two entries
    cbor2.dumps(["DescribePCR"]),                                      # not a map
    cbor2.dumps({"Error": 3}),                                         # error not text
    b"\xbf\x6bDescribePCR\xa2\x64lock\xf5\x64data\x40\xff",       # indefinite-length map
    b"\xa1\x6bDescribePCR\xa2\x64lock\xf5\x64data\x5b" + b"\xff" * 8,  # 2^64-1 byte string
    b"\xa1\x6bDescribePCR\xbb" + b"\xff" * 8,                      # 2^64-1 pairs
    b"\xa1\x6bDescribePCR\xa2\x64lock\xf5\x61x" + b"\x81" * 40 + b"\x00\x64data\x40",  # deep
], ids=lambda r: r[:12].hex() or "empty")
def test_malformed_responses_fail_cleanly(shimmed, tmp_path, response):
    proc, _ = _run(shimmed, tmp_path, ["2"], response)
    assert _failed(proc).startswith("nsm-pcr: DescribePCR 2: ")


def test_ioctl_failure(shimmed, tmp_path):
    proc, _ = _run(shimmed, tmp_path, ["1"], None)
    assert _failed(proc) == ("nsm-pcr: DescribePCR 1: ioctl NSM_IOCTL_RAW on /dev/null: "
                             "Inappropriate ioctl for device")


@pytest.mark.parametrize("args", [[], ["x"], ["-1"], ["65536"], ["1", "2x"], [""], ["+1"]])
def test_bad_arguments_send_nothing(shimmed, tmp_path, args):
    proc, requests = _run(shimmed, tmp_path, args, GOOD)
    _failed(proc)
    assert requests == []


@pytest.mark.skipif(Path("/dev/nsm").exists(), reason="this host has an NSM")
def test_without_an_nsm():
    proc = subprocess.run([str(recipes.build_static_program("nsm-pcr")), "0"],
                          capture_output=True, text=True, timeout=30)
    assert _failed(proc) == "nsm-pcr: open /dev/nsm: No such file or directory"
