"""check-eif and the preflight before every boot: a table of broken images, each reported with
its rule, and good images with no error or warning (docs/nitro-cli.md#check-eif). No QEMU."""

from __future__ import annotations

import json

import pytest

from harness import cpio
from harness.cli import main
from harness.errors import ErrorCode
from harness.images.recipes import cached_image
from harness.preflight import check_eif
from helpers.kernels import cached_kernel, cached_nsm_ko, fake_bzimage, vmlinux
from helpers.preflight_images import AARCH64, LD_SO, Image, elf_program, kernel_module

E = ErrorCode
#: An arm64 ``Image`` header (Documentation/arch/arm64/booting.rst): magic "ARM\x64" at 0x38.
ARM64_IMAGE = b"\0" * 0x38 + b"ARM\x64" + b"\0" * 4000


def problems(findings):
    """``{rule: severity}`` of the errors and warnings."""
    return {f.rule: f.severity for f in findings if f.severity != "info"}


def _relative(image):
    image.cmd = ["./app"]
    image.metadata = {"DockerInfo": {"Config": {"WorkingDir": "/srv"}}}


def _name_only_on_image_path(image):
    image.cmd = ["server"]
    image.env = ["PATH=/opt/tools:/usr/bin"]
    image.rootfs["opt/tools/server"] = cpio.Entry.file("opt/tools/server", elf_program(), mode=0o755)


def _script_without_env(image):
    image.cmd = ["/app/run.py"]
    image.rootfs["usr/bin/env"] = None


def _no_nsm_param_kernel(image):
    image.kernel = fake_bzimage(vmlinux(None, param=False))
    image.nsm_ko = kernel_module("6.12.9-test SMP mod_unload ")


# (id, change to the good image, rule, severity, texts the finding names)
BROKEN = [
    ("relative-cmd", _relative, "cmd-relative", "error", ("'./app'", "/srv/app", "WorkingDir")),
    ("missing-command", lambda i: setattr(i, "cmd", ["/usr/local/bin/server"]), "cmd-missing", "error",
     ("/usr/local/bin/server", "does not exist")),
    ("name-only-on-image-path", _name_only_on_image_path, "cmd-not-found", "error",
     ("'server'", "/opt/tools/server", "does not search")),
    ("dynamic-init-without-interpreter", lambda i: setattr(i, "init", elf_program(LD_SO)), "init-static",
     "error", (LD_SO, "statically")),
    ("missing-cmd", lambda i: setattr(i, "cmd", None), "cmd-present", "error", ("/cmd",)),
    ("missing-env", lambda i: setattr(i, "env", None), "env-present", "error", ("/env",)),
    ("kernel-without-cmdline-devices", _no_nsm_param_kernel, "kernel-cmdline-devices", "error",
     ("would not boot on Nitro", "ACPI layout")),
    ("mismatched-nsm-ko", lambda i: setattr(i, "nsm_ko", kernel_module("6.1.0-other SMP mod_unload ")),
     "nsm-vermagic", "error", ("6.1.0-other", "refuses the module")),
    ("no-nsm-ko", lambda i: setattr(i, "nsm_ko", None), "nsm-module", "warning", ("/nsm.ko",)),
    ("command-interpreter-missing",
     lambda i: i.rootfs.update({"bin/app": cpio.Entry.file("bin/app", elf_program("/lib/ld-musl-x86_64.so.1"),
                                                           mode=0o755)}),
     "cmd-interpreter", "error", ("/lib/ld-musl-x86_64.so.1",)),
    ("script-interpreter-missing", _script_without_env, "cmd-interpreter", "error", ("#!/usr/bin/env",)),
    ("not-executable", lambda i: i.rootfs.update({"bin/app": cpio.Entry.file("bin/app", elf_program(), mode=0o644)}),
     "cmd-executable", "error", ("chmod +x /bin/app",)),
    ("aarch64-command", lambda i: i.rootfs.update({"bin/app": cpio.Entry.file("bin/app", elf_program(
        machine=AARCH64), mode=0o755)}), "cmd-arch", "error", ("aarch64",)),
    ("missing-init", lambda i: setattr(i, "init", None), "init-present", "error", ("/init",)),
    ("not-a-bzimage", lambda i: setattr(i, "kernel", b"\x7fELF" + b"\0" * 4000), "kernel-format", "error",
     ("bzImage",)),
    # The header's architecture flag and the kernel must agree (docs/boot.md#aarch64-machine).
    ("aarch64-flag-on-a-bzimage", lambda i: setattr(i, "aarch64", True), "eif-arch", "error",
     ("flags 0x0001", "aarch64 image", "x86_64 (bzImage)")),
]


def test_a_good_image_has_no_error_or_warning(tmp_path):
    findings = check_eif(Image.good().write(tmp_path / "good.eif"), memory_mib=256)
    assert problems(findings) == {}
    # What is said as information: the signature's absence only (debug mode unknown: general).
    assert [f.rule for f in findings] == ["eif-signature", "debug-mode"]


@pytest.mark.parametrize("change, rule, severity, names", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_each_broken_image_is_reported_with_its_rule(change, rule, severity, names, tmp_path):
    image = Image.good()
    change(image)
    findings = check_eif(image.write(tmp_path / "broken.eif"))
    found = [f for f in findings if f.rule == rule]
    assert found, [f.line() for f in findings]
    assert found[0].severity == severity
    for name in names:
        assert name in found[0].line(), found[0].line()
    assert found[0].fix  # every finding says what to change
    # Nothing else is wrong with the image.
    assert set(problems(findings)) == {rule}, [f.line() for f in findings]


def test_an_arm64_kernel_without_the_flag_is_reported_once_as_eif_arch(tmp_path):
    image = Image.good()
    image.kernel = ARM64_IMAGE
    findings = check_eif(image.write(tmp_path / "arm.eif"))
    arch = [f for f in findings if f.rule == "eif-arch"]
    assert len(arch) == 1 and arch[0].code == E.EifParsingError
    assert "x86_64 image" in arch[0].message and "aarch64 (Image)" in arch[0].message
    # The kernel is what runs init and the command: those are checked against its architecture.
    assert "kernel-format" not in problems(findings)
    assert problems(findings)["init-arch"] == "error"


def test_too_little_memory_is_e26(tmp_path):
    path = Image.good().write(tmp_path / "good.eif")
    findings = check_eif(path, memory_mib=16)
    memory = [f for f in findings if f.rule == "memory"]
    assert memory[0].severity == "error" and memory[0].code == E.InsufficientMemoryRequested
    assert "--memory 64 or more" in memory[0].fix
    info = [f for f in check_eif(path) if f.rule == "memory"][0]
    assert info.severity == "info" and "--memory 64" in info.message


def test_a_corrupt_crc_is_e35(tmp_path):
    path = Image.good().write(tmp_path / "good.eif")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last ramdisk's padding: still a valid layout
    path.write_bytes(bytes(data))
    crc = [f for f in check_eif(path) if f.rule == "eif-crc"]
    assert crc and crc[0].code == E.EifParsingError


def test_debug_mode_says_what_attestation_loses(tmp_path):
    path = Image.good().write(tmp_path / "good.eif")
    debug = [f for f in check_eif(path, debug_mode=True) if f.rule == "debug-mode"]
    assert debug[0].severity == "info" and "PCR0, PCR1, PCR2 and PCR8 as zeros" in debug[0].message
    assert [f for f in check_eif(path, debug_mode=False) if f.rule == "debug-mode"] == []


def test_relative_command_that_happens_to_resolve_is_a_warning(tmp_path):
    image = Image.good()
    image.cmd = ["bin/app"]  # resolves from / because the app lives at /bin/app
    found = [f for f in check_eif(image.write(tmp_path / "r.eif")) if f.rule == "cmd-relative"]
    assert found[0].severity == "warning" and "/bin/app" in found[0].message


def test_debians_kernel_is_reported_as_not_booting_on_nitro(tmp_path):
    kernel = cached_kernel("debian")
    nsm = cached_nsm_ko("debian")
    if kernel is None or nsm is None:
        pytest.skip("Debian's cloud kernel is not unpacked in the cache ({cache}/kernels)")
    image = Image.good()
    image.kernel, image.nsm_ko = kernel.read_bytes(), nsm.read_bytes()
    findings = check_eif(image.write(tmp_path / "debian.eif"))
    if any(f.rule == "kernel-cmdline-devices" and f.severity == "warning" for f in findings):
        pytest.skip("cannot decompress Debian's zstd kernel here")
    assert problems(findings) == {"kernel-cmdline-devices": "error"}


def test_hello_kernel_with_debians_nsm_ko_is_a_vermagic_error(tmp_path):
    if cached_kernel("nitro") is None or cached_nsm_ko("debian") is None:
        pytest.skip("needs hello's kernel and Debian's nsm.ko in the cache")
    image = Image.good()
    image.nsm_ko = cached_nsm_ko("debian").read_bytes()
    findings = check_eif(image.write(tmp_path / "mixed.eif"))
    assert problems(findings) == {"nsm-vermagic": "error"}
    line = [f.line() for f in findings if f.rule == "nsm-vermagic"][0]
    assert "+deb12-cloud-amd64" in line and "nitro-harness" in line


def test_the_shipped_hello_image_has_no_error_or_warning():
    # The image this checkout builds, never an older build of hello left in the cache.
    hello = cached_image("hello")
    if hello is None:
        pytest.skip("hello is not built for this checkout (nitro-harness images build hello)")
    assert problems(check_eif(hello, memory_mib=256)) == {}


def test_cli_prints_one_line_per_finding_and_exits_with_the_first_errors_code(tmp_path, capsys):
    image = Image.good()
    image.cmd = ["./app"]
    path = image.write(tmp_path / "rel.eif")
    assert main(["check-eif", "--eif-path", str(path), "--memory", "16"]) == E.EnclaveBootFailure.value
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("info eif-signature: ")
    assert lines[1].startswith("error cmd-relative: /cmd runs './app'") and "; fix: " in lines[1]
    assert any(line.startswith("error memory: ") for line in lines)
    assert err.splitlines()[-1].startswith("[ E36 ] EnclaveBootFailure: ")
    assert "2 error(s) found; the first: cmd-relative" in err

    assert main(["check-eif", "--eif-path", str(Image.good().write(tmp_path / "ok.eif")), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["Errors"], doc["Warnings"]) == (0, 0)
    assert [f["Rule"] for f in doc["Findings"]] == ["eif-signature", "memory", "debug-mode"]
    assert set(doc["Findings"][0]) == {"Severity", "Rule", "Message", "Fix"}


def test_the_boot_preflight_is_recorded_and_explains_a_missing_heartbeat(tmp_path):
    from harness import enclave_boot
    from harness.enclave import EnclaveConfig
    from harness.errors import NitroError

    image = Image.good()
    image.nsm_ko = kernel_module("6.1.0-other SMP mod_unload ")
    path = image.write(tmp_path / "bad-nsm.eif")
    config = EnclaveConfig(eif_path=path, memory_mib=256, cpu_count=1)
    findings = enclave_boot.preflight(path, config, None, None, tmp_path)
    assert "error nsm-vermagic: " in (tmp_path / "preflight.txt").read_text()
    with pytest.raises(NitroError) as err:
        with enclave_boot.explained_by(findings):
            raise NitroError(E.EnclaveBootFailure, "no heartbeat", details="last console lines: ...")
    assert err.value.details.startswith("last console lines: ...\npreflight findings:\nerror nsm-vermagic")
    # A preflight that cannot run is a warning, never a failed boot.
    broken = enclave_boot.preflight(tmp_path / "missing.eif", config, None, None, tmp_path)
    assert [f.rule for f in broken] == ["preflight"] and broken[0].severity == "warning"


def test_run_enclave_prints_the_preflight_as_warnings(tmp_path, capsys, monkeypatch):
    # The supervising process answers with the preflight's lines; run-enclave prints each as a
    # warning on stderr and keeps nitro-cli's JSON on stdout.
    from harness.cli import enclave_commands

    eif_path = Image.good().write(tmp_path / "x.eif")
    answer = {"ok": {"EnclaveName": "x", "EnclaveID": "i-1-enc0", "ProcessID": 1, "EnclaveCID": 16,
                     "NumberOfCPUs": 1, "CPUIDs": [1], "MemoryMiB": 256},
              "control_socket": "/nowhere", "preflight": ["error cmd-relative: /cmd runs './app'; fix: ..."]}

    class Supervisor:
        def __init__(self, *args, **kwargs):
            import io
            self.stdin, self.stdout, self.returncode = io.StringIO(), io.StringIO(json.dumps(answer) + "\n"), 0

        def wait(self):
            return 0

    monkeypatch.setattr(enclave_commands.subprocess, "Popen", Supervisor)
    assert main(["run-enclave", "--eif-path", str(eif_path), "--memory", "256", "--cpu-count", "1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == answer["ok"]
    assert "warning: preflight: error cmd-relative: /cmd runs './app'; fix: ...\n" in err


def test_describe_enclaves_warns_for_an_eif_that_would_not_boot_on_nitro(tmp_path, capsys, monkeypatch):
    import os

    from harness.registry import EnclaveRecord, Registry

    monkeypatch.setenv("NITRO_HARNESS_RUNTIME_DIR", str(tmp_path / "run"))
    record = EnclaveRecord(slot=0, enclave_id="i-1-enc0", name="deb", cid=16, cpu_ids=[1], memory_mib=256,
                           pid=os.getpid(), state_dir=str(tmp_path), nitro_warning="this EIF would not boot on Nitro: x")
    Registry().put(record)
    assert main(["describe-enclaves"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == [record.describe()]  # nitro-cli's shape, no extra field
    assert "nitro_warning" not in out and "Nitro" not in out
    assert err == "warning: enclave i-1-enc0: this EIF would not boot on Nitro: x\n"
