"""``nitro-harness doctor``: can this host run enclaves, and how to fix what is missing.

Human text by default, ``--json`` for machines (2-space JSON on stdout, docs/nitro-cli.md#conventions). Exit status 0
when every required piece is present (enclaves can boot, with KVM or TCG), 1 when a check
failed; the report itself names the command that fixes each failure.

JSON keys (``harness.doctor.Report.to_json``): ``ok`` (bool); ``qemu`` (null when none was
found, else ``path``, ``version`` "X.Y.Z", ``machines`` {microvm, nitro-enclave: bool},
``devices`` {vhost-user-device: {present, creatable, detail}, vhost-user-vsock-device,
virtio-nsm-device: bool}, ``accelerators``, ``fit_for_enclaves``, ``data_dirs``,
``kernel_loader``, ``build_info``); ``firmware`` (qboot path or null); ``accelerator``
{choice: "kvm"|"tcg", reason}; ``host`` (``harness.host.HostFacts.to_json``: cpus,
enclave_pool, hugepages, kvm, vhost_vsock, memory_kib); ``checks`` [{name, status:
ok|warn|fail|info, detail, fix}].
"""

from __future__ import annotations

import argparse
import sys

from harness.cli import print_json, progress


def register(subparsers) -> None:
    """Add ``doctor`` to ``subparsers``."""
    parser = subparsers.add_parser(
        "doctor",
        help="check QEMU, firmware, accelerator, CPUs and hugepages for running enclaves",
        description=(
            "Report the QEMU in use (path, version; vhost-user-device, vhost-user-vsock-device, "
            "microvm, nitro-enclave), qboot, the accelerator choice (KVM only when /dev/kvm "
            "opens, the CPU has vmx/svm and a probe boot works; else TCG) with its reason, "
            "/dev/vhost-vsock, hugepages and the CPUs that can form an enclave pool. Exit 0 when "
            "enclaves can boot, 1 when a required piece is missing."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--qemu", metavar="PATH", default=None,
        help="examine this qemu-system-x86_64 instead of the one the harness would use",
    )
    # For tests and for diagnosing a copied tree: read /proc, /sys and /dev under this root.
    parser.add_argument("--host-root", default="/", help=argparse.SUPPRESS)
    parser.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    """Run the diagnosis and print it; return 0 when ready, 1 otherwise."""
    from harness.doctor import diagnose

    if not args.json:
        progress("doctor: probing QEMU and the host ...")
    report = diagnose(args.host_root, qemu_path=args.qemu)
    if args.json:
        print_json(report.to_json())
    else:
        sys.stdout.write(report.to_text())
        sys.stdout.flush()
    return 0 if report.ok else 1
