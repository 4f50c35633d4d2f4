"""OCI image-layout tarballs assembled without Docker (harness.images.oci_archive, the
``oci_archive`` step): read back by the harness's own archive reader (and thus by
``build-enclave --docker-archive``), layered over an EIF's root filesystem, with wheels installed
by pip and compiled, reproducible byte for byte."""

from __future__ import annotations

import json
import stat
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from harness import eif
from harness import scenario as scn
from harness.cpio import Entry
from harness.errors import NitroError
from harness.images.docker_archive import load_docker_archive
from harness.images.oci_archive import ImageFile, build_oci_archive, eif_rootfs, python_version
from harness.images.ramdisk import build_customer_ramdisk

PY = f"python3.{sys.version_info[1]}"


def base_eif(tmp_path: Path) -> Path:
    """An EIF whose customer ramdisk holds a small root filesystem, cmd and env."""
    entries = [Entry.directory("usr"), Entry.directory("usr/bin"),
               Entry.file(f"usr/bin/{PY}", b"\x7fELF python", mode=0o755),
               Entry.symlink("usr/bin/python3", PY), Entry.directory("etc"),
               Entry.file("etc/motd", b"base\n"), Entry.device("dev/null", "c", 1, 3, 0o666)]
    ramdisk = build_customer_ramdisk(tmp_path / "customer.cpio", entries, ["/bin/sh"],
                                     ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"])
    path = tmp_path / "base.eif"
    eif.write_eif(path, b"\x7fkernel" * 100, "console=ttyS0", [b"bootstrap" * 10, ramdisk], None)
    return path


def wheel(tmp_path: Path) -> Path:
    """A pure-Python wheel of the project ``demo`` 1.0 (module demo.py)."""
    path = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("demo.py", "VALUE = frozenset({'a', 'b', 'c'})\n")
        z.writestr("demo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
        z.writestr("demo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        z.writestr("demo-1.0.dist-info/RECORD", "demo.py,,\ndemo-1.0.dist-info/METADATA,,\n"
                                                "demo-1.0.dist-info/WHEEL,,\ndemo-1.0.dist-info/RECORD,,\n")
    return path


def test_eif_rootfs_reads_the_customer_ramdisk(tmp_path):
    entries, cmd, env = eif_rootfs(base_eif(tmp_path))
    by_name = {e.name: e for e in entries}
    assert by_name["etc/motd"].data == b"base\n"
    assert by_name["usr/bin/python3"].data == PY.encode() and stat.S_ISLNK(by_name["usr/bin/python3"].mode)
    assert (by_name["dev/null"].rdevmajor, by_name["dev/null"].rdevminor) == (1, 3)
    assert cmd == ["/bin/sh"] and env == ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]
    assert python_version(entries) == sys.version_info[:2]
    with pytest.raises(NitroError, match="no customer ramdisk"):
        path = tmp_path / "one.eif"
        eif.write_eif(path, b"\x7fkernel" * 100, "console=ttyS0", [b"bootstrap"], None)
        eif_rootfs(path)


def test_an_archive_over_a_base_reads_back_with_its_layers_files_and_wheel(tmp_path):
    out = tmp_path / "out" / "app.tar"
    demo = wheel(tmp_path)
    digest = build_oci_archive(
        out, base=base_eif(tmp_path), wheels=[demo],
        files=[ImageFile("/app/run.sh", b"#!/bin/sh\necho hi\n", 0o755), ImageFile("/etc/motd", b"app\n")],
        env=["LANG=C", "APP=1"], tag="demo:2")
    archive, entries = load_docker_archive(out, tmp_path / "work")
    assert archive.format == "oci" and archive.repo_tags == ["demo:2"] and len(archive.layers) == 2
    assert archive.cmd == ["/bin/sh"]  # the base's
    assert archive.env == ["PATH=/usr/bin:/bin", "LANG=C", "APP=1"]  # LANG replaced, APP added
    files = {e.name: e for e in entries}
    assert files["etc/motd"].source.read_bytes() == b"app\n"  # the upper layer wins
    assert stat.S_IMODE(files["app/run.sh"].mode) == 0o755
    assert files["app/run.sh"].mtime == 1492533000 and files["app/run.sh"].uid == 0
    site = "usr/lib/python3/dist-packages"
    assert files[f"{site}/demo.py"].source.read_bytes().startswith(b"VALUE")
    assert f"{site}/demo-1.0.dist-info/INSTALLER" in files  # installed by pip, not unpacked
    tag = sys.implementation.cache_tag
    assert f"{site}/__pycache__/demo.{tag}.pyc" in files  # same Python as the image: compiled
    manifest = json.loads(tarfile.open(out).extractfile(f"blobs/sha256/{digest[7:]}").read())
    assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar"] * 2
    # The same inputs give the same bytes (sorted members, fixed times, PYTHONHASHSEED=0 pycs;
    # pip records the wheel's hash, so the same wheel file).
    again = tmp_path / "again.tar"
    assert build_oci_archive(again, base=base_eif(tmp_path), wheels=[demo],
                             files=[ImageFile("/app/run.sh", b"#!/bin/sh\necho hi\n", 0o755),
                                    ImageFile("/etc/motd", b"app\n")],
                             env=["LANG=C", "APP=1"], tag="demo:2") == digest
    assert again.read_bytes() == out.read_bytes()


def test_without_a_base_and_with_bad_paths(tmp_path):
    out = tmp_path / "only.tar"
    build_oci_archive(out, base=None, files=[ImageFile("/hello", b"x")], cmd=["/hello"])
    archive, entries = load_docker_archive(out, tmp_path / "work")
    assert [e.name for e in entries] == ["hello"] and archive.cmd == ["/hello"] and archive.env == []
    with pytest.raises(NitroError, match="files: a path in the image is absolute"):
        build_oci_archive(out, base=None, files=[ImageFile("relative", b"x")])


def test_the_step_writes_into_the_artifacts_and_reads_files_next_to_the_scenario(tmp_path):
    (tmp_path / "any.eif").write_bytes(b"never read")
    (tmp_path / "app.py").write_text("print('app')\n")
    path = tmp_path / "case.yaml"
    path.write_text(textwrap.dedent("""\
        eif: any.eif
        steps:
          - oci_archive:
              output: app.tar
              files:
                - {path: /app/app.py, source: app.py}
                - {path: /app/VERSION, content: "2\\n", mode: 0600}
              cmd: [python3, /app/app.py]
              tag: app:2
          - oci_archive:
              output: broken.tar
              files: [{path: /x, source: missing.txt}]
        """))
    (case,) = scn.load_scenarios(path)
    artifacts = tmp_path / "artifacts"
    result = scn.ScenarioRunner(case, scn.EnclaveFactory(artifacts), artifacts_dir=artifacts).run()
    assert [s.status for s in result.steps] == ["passed", "failed"]
    assert "files[0].source: " in result.message and "missing.txt" in result.message
    archive, entries = load_docker_archive(artifacts / "app.tar", tmp_path / "work")
    assert archive.cmd == ["python3", "/app/app.py"] and archive.repo_tags == ["app:2"]
    modes = {e.name: stat.S_IMODE(e.mode) for e in entries}
    assert modes["app/VERSION"] == 0o600 and modes["app/app.py"] == 0o644
    assert "app.tar: manifest sha256:" in (artifacts / "oci_archive.log").read_text()
    with pytest.raises(scn.ScenarioError, match="a file has a path and exactly one of source"):
        path.write_text("eif: any.eif\nsteps:\n  - oci_archive: {output: a.tar, files: [{path: /x}]}\n")
        scn.load_scenarios(path)
