"""Image builds: the hello EIF entry by entry, the caches, the docker-archive and directory
applications, the python image. Recipe checks that build nothing are tests/unit/test_recipes.py.

Uses the package cache that ``nitro-harness setup`` fills (it builds hello); expected values are
computed here independently: SHA-384 over the sections for PCRs, bytes straight out of the
Debian packages (``dpkg-deb --fsys-tarfile``) for files, the ELF header read with ``struct``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import re
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from harness.cpio import read_cpio
from harness.eif import measure_eif, read_eif
from harness.errors import ErrorCode, NitroError
from harness.images import debian, recipes
from helpers.boot_images import AWS_CMDLINE

ROOTFS_MOUNT_POINTS = ("dev", "run", "sys", "var", "proc", "tmp")


def _ext(digest: bytes) -> bytes:
    return hashlib.sha384(bytes(48) + digest).digest()


def _section_bytes(eif, section) -> bytes:
    with open(eif.path, "rb") as f:
        f.seek(section.data_offset)
        return f.read(section.size)


def _deb_member(deb: Path, member: str) -> tarfile.TarInfo | bytes:
    """Bytes of ``member`` (or its TarInfo for non-files) read from a .deb with dpkg-deb."""
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                               check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for m in tf.getmembers():
            if m.name.lstrip("./") == member:
                return tf.extractfile(m).read() if m.isfile() else m
    raise AssertionError(f"{member} not in {deb}")


# These tests look inside the kernel package and its modules, so they build the hello
# application on Debian's cloud kernel; the shipped `hello` differs only in its kernel (the
# harness's Nitro-style build, tested in test_prebuilt_kernel_directory_recipe and test_layout).
HELLO = "hello-debian"


@pytest.fixture(scope="module")
def hello():
    """The hello application on Debian's kernel (from the cache) and its parts."""
    built = recipes.build(HELLO)
    eif = read_eif(built.path)
    boot = {r.name: r for r in read_cpio(_section_bytes(eif, eif.ramdisks[0]))}
    cust = {r.name: r for r in read_cpio(_section_bytes(eif, eif.ramdisks[1]))}
    return built, eif, boot, cust


def _kernel_root(built) -> Path:
    """The kernel package as ``dpkg -x`` unpacked it into the cache (no apt call)."""
    k = built.info["Kernel"]
    roots = list((debian.cache_root() / "kernels").glob(f"{k['package']}_{k['version']}_*"))
    assert len(roots) == 1, roots
    return roots[0]


def _kernel(built) -> recipes.Kernel:
    k = built.info["Kernel"]
    root = _kernel_root(built)
    pkg = debian.DebPackage(k["package"], k["version"], "amd64", root.name.rsplit("_", 1)[1], 0)
    return recipes.Kernel(pkg, k["release"], root)


# --- the hello image, entry by entry ----------------------------------------------------


def test_hello_sections_and_pcrs(hello):
    built, eif, _, _ = hello
    kernel = _section_bytes(eif, eif.kernel)
    cmdline = _section_bytes(eif, eif.cmdline_section)
    rd = [_section_bytes(eif, r) for r in eif.ramdisks]
    assert len(rd) == 2 and not eif.is_signed
    assert cmdline == AWS_CMDLINE.encode()  # docs/boot.md#kernel-command-line, no trailing NUL
    # (docs/eif-format.md#command-line-section)
    # bzImage: boot protocol magic "HdrS" at 0x202 (Linux x86 boot protocol).
    assert kernel[0x202:0x206] == b"HdrS"
    pcr0 = _ext(hashlib.sha384(kernel + cmdline + rd[0] + rd[1]).digest())
    pcr1 = _ext(hashlib.sha384(kernel + cmdline + rd[0]).digest())
    pcr2 = _ext(hashlib.sha384(rd[1]).digest())
    meas = built.info["Measurements"]
    assert (meas["PCR0"], meas["PCR1"], meas["PCR2"]) == (pcr0.hex(), pcr1.hex(), pcr2.hex())
    m = measure_eif(built.path)
    assert (m.pcr0, m.pcr1, m.pcr2) == (pcr0, pcr1, pcr2)
    # The kernel is the Debian package's vmlinuz, byte for byte.
    release = built.info["Kernel"]["release"]
    assert (_kernel_root(built) / "boot" / f"vmlinuz-{release}").read_bytes() == kernel


def test_hello_bootstrap_ramdisk(hello):
    built, _, boot, _ = hello
    mods = ["virtio_mmio", "vsock", "vmw_vsock_virtio_transport_common",
            "vmw_vsock_virtio_transport"]
    expected = {"dev", "init", "nsm.ko", "modules", "modules/order"} | {
        f"modules/{m}.ko" for m in mods}
    assert set(boot) == expected
    assert boot["dev"].mode == stat.S_IFDIR | 0o755
    assert boot["init"].mode == stat.S_IFREG | 0o755
    assert boot["nsm.ko"].mode == stat.S_IFREG | 0o755  # docs/boot.md#bootstrap-ramdisk
    assert boot["modules/order"].mode == stat.S_IFREG | 0o644
    assert all(r.uid == 0 and r.gid == 0 for r in boot.values())
    order = boot["modules/order"].data.decode().splitlines()
    assert set(order) == {f"{m}.ko" for m in mods}
    # Dependency order from .modinfo, read here with a regex instead of an ELF parser.
    for name in order:
        deps = re.search(rb"depends=([^\0]*)\0", boot[f"modules/{name}"].data).group(1)
        for d in filter(None, deps.decode().split(",")):
            assert order.index(f"{d}.ko") < order.index(name), (name, d)
    # init is the static binary built from harness/data/programs/init, nsm.ko the package's module, unpacked.
    assert boot["init"].data == recipes.build_init().read_bytes()
    release = built.info["Kernel"]["release"]
    nsm_xz = _kernel_root(built) / "lib/modules" / release / "kernel/drivers/misc/nsm.ko.xz"
    assert boot["nsm.ko"].data == lzma.decompress(nsm_xz.read_bytes())
    assert b"name=nsm\0" in boot["nsm.ko"].data


def test_hello_customer_ramdisk(hello):
    built, _, _, cust = hello
    assert cust["cmd"].data == b"/usr/bin/hello\n"
    assert cust["env"].data == b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    assert cust["cmd"].mode == cust["env"].mode == stat.S_IFREG | 0o644
    assert cust["rootfs"].mode == stat.S_IFDIR | 0o755
    for d in ROOTFS_MOUNT_POINTS:
        assert cust[f"rootfs/{d}"].mode == stat.S_IFDIR | 0o755, d
    names = set(cust)
    assert all(n in ("cmd", "env") or n == "rootfs" or n.startswith("rootfs/") for n in names)
    # Package files belong to root whoever built the image; nothing else sneaks in.
    assert all(r.uid == 0 and r.gid == 0 for r in cust.values())
    assert not any(n.startswith("rootfs/usr/share/doc") for n in names)
    # busybox is the package's binary; applets are symlinks to it.
    bb = cust["rootfs/bin/busybox"]
    assert bb.mode == stat.S_IFREG | 0o755
    version = built.info["Packages"]["busybox-static"]
    deb = debian.deb_cache() / f"busybox-static_{version.replace(':', '%3a')}_amd64.deb"
    assert bb.data == _deb_member(deb, "bin/busybox")
    for applet in ("bin/sh", "bin/sleep", "usr/bin/printf"):
        r = cust[f"rootfs/{applet}"]
        assert stat.S_ISLNK(r.mode) and r.data == b"/bin/busybox", applet
    # linuxkit's changes (docs/boot.md#image-changes).
    assert cust["rootfs/etc/resolv.conf"].data == b"/run/resolvconf/resolv.conf"
    assert cust["rootfs/etc/mtab"].data == b"/proc/mounts"
    hello_sh = cust["rootfs/usr/bin/hello"]
    assert hello_sh.mode == stat.S_IFREG | 0o755
    assert hello_sh.mtime == recipes.FIXED_MTIME


def test_hello_application_output(hello, tmp_path):
    """The application prints its PCRs once (nsm-pcr, tests/unit/test_nsm_pcr.py), then AWS's
    launch-post lines; run with the image's own busybox sh (sleep replaced by a shell function
    that stops after three lines, nsm-pcr by a script that echoes its arguments)."""
    _, _, _, cust = hello
    bb = tmp_path / "busybox"
    bb.write_bytes(cust["rootfs/bin/busybox"].data)
    bb.chmod(0o755)
    script = cust["rootfs/usr/bin/hello"].data.decode()
    assert script.startswith("#!/bin/sh\n")
    stub = 'sleep() { [ "$i" -gt 3 ] && exit 0; return 0; }\n'
    # (A shell function cannot be called nsm-pcr: a stand-in program on PATH that fails,
    # which must not stop the greetings.)
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "nsm-pcr"
    fake.write_text('#!/bin/sh\necho "nsm-pcr $*"\nexit 1\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    out = subprocess.run([str(bb), "sh", "-c", stub + script], capture_output=True, text=True,
                         timeout=30, check=True, env=env).stdout
    assert out == ("nsm-pcr 0 1 2\n"
                   "[   1] Hello from the enclave side!\n"
                   "[   2] Hello from the enclave side!\n"
                   "[   3] Hello from the enclave side!\n")


# --- caching and determinism --------------------------------------------------------------


def _copy_recipe(tmp_path: Path, name: str, **changes) -> Path:
    import yaml
    raw = yaml.safe_load(recipes.recipe_path(HELLO).read_text())
    raw["name"] = name
    raw.update(changes)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _forget(built) -> None:
    """Remove a test-only image from the shared cache (the next run builds it cold again)."""
    p = Path(built.info["EifPath"])
    p.unlink(missing_ok=True)
    p.with_suffix(".json").unlink(missing_ok=True)


def test_cache_hit_is_the_same_file(hello, tmp_path):
    built, _, _, _ = hello
    again = recipes.build(HELLO)
    assert again.cached and again.path == built.path
    assert again.info["Measurements"] == built.info["Measurements"]
    out = tmp_path / "out" / "hello.eif"
    out.parent.mkdir()
    copy = recipes.build(HELLO, out)
    assert copy.path == out and out.read_bytes() == built.path.read_bytes()


def test_cold_build_reproduces_pcrs(hello, tmp_path):
    """The same recipe under another name (metadata only) builds cold to the same PCRs."""
    built, _, _, _ = hello
    cold = recipes.build(_copy_recipe(tmp_path, "test-hello-cold"))
    try:
        assert not cold.cached and cold.path != built.path
        assert cold.info["Measurements"] == built.info["Measurements"]
    finally:
        _forget(cold)


def test_cmd_override_changes_only_pcr2(hello):
    built, _, _, _ = hello
    other = recipes.build(HELLO, cmd=["/bin/sh", "-c", "echo hi"], env=["A=1"])
    try:
        m0, m1 = built.info["Measurements"], other.info["Measurements"]
        assert m1["PCR1"] == m0["PCR1"] and m1["PCR2"] != m0["PCR2"]
        eif = read_eif(other.path)
        cust = {r.name: r for r in read_cpio(_section_bytes(eif, eif.ramdisks[1]))}
        assert cust["cmd"].data == b"/bin/sh\n-c\necho hi\n" and cust["env"].data == b"A=1\n"
    finally:
        _forget(other)


# --- applications from a docker archive or a directory ----------------------------------


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def _oci_tarball(path: Path) -> None:
    """A one-layer OCI image layout: /app/run.sh (0750, uid 1000) and /app/data (a dir)."""
    script = b"#!/bin/sh\necho from-oci\n"
    f = tarfile.TarInfo("app/run.sh")
    f.size, f.mode, f.uid, f.gid, f.mtime = len(script), 0o750, 1000, 1001, 1600000000
    d = tarfile.TarInfo("app/data")
    d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o700, 1600000001
    app = tarfile.TarInfo("app")
    app.type, app.mode, app.mtime = tarfile.DIRTYPE, 0o755, 1600000002
    layer = _tar_bytes([(app, None), (f, script), (d, None)], gz=True)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2020-09-13T12:26:40Z",
        "config": {"Env": ["PATH=/usr/bin:/bin", "GREETING=hi"], "Cmd": ["/app/run.sh"],
                   "Entrypoint": ["/should/not/be/used"]},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()]},
    }).encode()

    def desc(media: str, blob: bytes) -> dict:
        return {"mediaType": media, "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
                "size": len(blob)}

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", config),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", layer)],
    }).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        desc("application/vnd.oci.image.manifest.v1+json", manifest)]}).encode()
    members = []
    for name, blob in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                       ("index.json", index)] + [
            (f"blobs/sha256/{hashlib.sha256(b).hexdigest()}", b)
            for b in (config, layer, manifest)]:
        ti = tarfile.TarInfo(name)
        ti.size = len(blob)
        members.append((ti, blob))
    path.write_bytes(_tar_bytes(members))


def test_docker_archive_recipe(hello, tmp_path):
    built, _, _, _ = hello
    _oci_tarball(tmp_path / "app.tar")
    recipe = tmp_path / "oci-app.yaml"
    recipe.write_text(
        "name: test-oci-app\n"
        "kernel:\n  package: linux-image-6.12-cloud-amd64\n"
        "  modules: [virtio_mmio, vmw_vsock_virtio_transport]\n"
        "application:\n  docker_archive: app.tar\n")
    img = recipes.build(recipe)
    try:
        eif = read_eif(img.path)
        cust = {r.name: r for r in read_cpio(_section_bytes(eif, eif.ramdisks[1]))}
        # Cmd wins over Entrypoint; Env as the image has it (docs/boot.md#cmd-and-env).
        assert cust["cmd"].data == b"/app/run.sh\n"
        assert cust["env"].data == b"PATH=/usr/bin:/bin\nGREETING=hi\n"
        run = cust["rootfs/app/run.sh"]
        assert (run.mode, run.uid, run.gid, run.mtime) == (stat.S_IFREG | 0o750, 1000, 1001,
                                                            1600000000)
        assert run.data == b"#!/bin/sh\necho from-oci\n"
        assert cust["rootfs/app/data"].mode == stat.S_IFDIR | 0o700
        # Same kernel, modules, init: same PCR1 as hello; a different application: PCR2.
        assert img.info["Measurements"]["PCR1"] == built.info["Measurements"]["PCR1"]
        assert img.info["Cmd"] == ["/app/run.sh"]
        meta = eif.metadata
        assert meta["DockerInfo"]["Config"]["Cmd"] == ["/app/run.sh"]
    finally:
        _forget(img)


def test_directory_recipe_with_debs(tmp_path):
    app = tmp_path / "approot"
    (app / "srv").mkdir(parents=True)
    (app / "srv" / "hello.txt").write_text("hi\n")
    recipe = tmp_path / "dir-app.yaml"
    recipe.write_text(
        "name: test-dir-app\n"
        "kernel:\n  package: linux-image-6.12-cloud-amd64\n  nsm: null\n"
        "application:\n  directory: approot\n"
        "rootfs:\n  debs: [busybox-static]\n  busybox_links: true\n"
        "cmd: [cat, /srv/hello.txt]\n")
    img = recipes.build(recipe)
    try:
        eif = read_eif(img.path)
        boot = {r.name for r in read_cpio(_section_bytes(eif, eif.ramdisks[0]))}
        assert boot == {"dev", "init"}  # nsm: null, no modules: exactly AWS's layout minus nsm
        cust = {r.name: r for r in read_cpio(_section_bytes(eif, eif.ramdisks[1]))}
        assert cust["rootfs/srv/hello.txt"].data == b"hi\n"
        assert stat.S_ISLNK(cust["rootfs/bin/cat"].mode)
        assert cust["cmd"].data == b"cat\n/srv/hello.txt\n" and cust["env"].data == b""
    finally:
        _forget(img)


# --- kernel modules -----------------------------------------------------------------------


def test_module_load_order_and_builtins(hello):
    built, _, _, _ = hello
    k = _kernel(built)
    order, builtin = recipes.module_load_order(k, ["vmw_vsock_virtio_transport", "virtio"])
    assert order == ["vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"]
    assert builtin == ["virtio"]  # Debian's cloud kernel: virtio core built in, mmio a module
    with pytest.raises(NitroError) as e:
        recipes.module_load_order(k, ["no_such_module"])
    assert e.value.code == ErrorCode.EifBuildingError and "no_such_module" in e.value.message


# --- the command line ----------------------------------------------------------------------


def test_cli_images_build_prints_measurements(hello, tmp_path, capsys):
    from harness.cli import main
    built, _, _, _ = hello
    out = tmp_path / "h.eif"
    assert main(["images", "build", HELLO, "--output-file", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["EifPath"] == str(out) and doc["Cached"] is True
    assert doc["Measurements"] == built.info["Measurements"]
    assert out.read_bytes() == built.path.read_bytes()
    assert main(["images", "build", "no-such-recipe"]) == ErrorCode.EifBuildingError.value


# --- the python image -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def python_image(tmp_path_factory):
    """The python image, its customer ramdisk records, and that ramdisk unpacked on disk."""
    from harness.cpio import extract_cpio
    built = recipes.build("python")
    eif = read_eif(built.path)
    records = read_cpio(_section_bytes(eif, eif.ramdisks[1]))
    out = tmp_path_factory.mktemp("python-image")
    extract_cpio(records, out)
    return built, {r.name: r for r in records}, out / "rootfs"


def test_python_image_contents(python_image):
    built, cust, _ = python_image
    assert cust["cmd"].data == b"/bin/sh\n"
    env = cust["env"].data.decode().splitlines()
    assert "PYTHONPATH=/opt/nitro-harness" in env
    assert any(e.startswith("PATH=/opt/nitro-harness:") for e in env)
    # Packages in, skipped ones and pruned paths out.
    assert {"python3.11-minimal", "python3-cryptography", "python3-cbor2", "python3-asn1crypto",
            "busybox", "libssl3"} <= set(built.info["Packages"])
    assert not {"dpkg", "perl-base", "tzdata", "libsqlite3-0"} & set(built.info["Packages"])
    names = set(cust)
    assert not any(n.startswith(("rootfs/usr/share/doc/", "rootfs/usr/lib/python3.11/test/"))
                   for n in names)
    dist = "rootfs/usr/lib/python3/dist-packages"
    assert f"{dist}/aws_nsm_interface/__init__.py" in names
    assert f"{dist}/ioctl_opt/__init__.py" in names
    assert stat.S_ISLNK(cust["rootfs/bin/sh"].mode) and cust["rootfs/bin/sh"].data == b"/bin/busybox"
    # Every file of harness/data/guest/ is in /opt/nitro-harness with its executable bit.
    guest = recipes.guest_dir()
    for p in sorted(guest.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"):
            r = cust[f"rootfs/opt/nitro-harness/{p.relative_to(guest).as_posix()}"]
            assert r.data == p.read_bytes()
            want = 0o755 if p.stat().st_mode & 0o111 else 0o644
            assert r.mode == stat.S_IFREG | want and (r.uid, r.gid) == (0, 0)
    # Precompiled, hash-based unchecked pycs (PEP 552 flags word = 1) for the stdlib.
    pyc = cust["rootfs/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc"]
    assert int.from_bytes(pyc.data[4:8], "little") == 1


def test_python_image_interpreter_runs(python_image):
    """The guest's own python (through the guest's own dynamic loader) imports every module
    the NSM/KMS helpers need, including aws-nsm-interface from PyPI."""
    _, _, root = python_image
    loader = root / "lib" / "x86_64-linux-gnu" / "ld-linux-x86-64.so.2"
    libs = f"{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu"
    code = ("import sys, aws_nsm_interface, cbor2, asn1crypto, cryptography, ssl, ctypes\n"
            "from cryptography.hazmat.primitives.asymmetric import ec, rsa\n"
            "ec.generate_private_key(ec.SECP384R1())\n"
            "print(sys.version.split()[0], cryptography.__version__, cbor2.__name__)\n")
    proc = subprocess.run(
        [str(loader), "--library-path", libs, str(root / "usr/bin/python3.11"), "-c", code],
        env={"PYTHONHOME": str(root / "usr"), "PYTHONDONTWRITEBYTECODE": "1",
             "PYTHONPATH": f"{root}/usr/lib/python3/dist-packages:{root}/opt/nitro-harness"},
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3.11.2", "38.0.4", "cbor2"]


def test_prebuilt_kernel_directory_recipe(hello, tmp_path):
    """kernel.directory: a prebuilt bzImage (+ nsm.ko) gives AWS's bootstrap layout exactly
    (dev, init, nsm.ko; no modules/); a glob picks the newest complete build."""
    built, eif0, boot0, _ = hello
    for n, stamp in (("kernel-a", 1), ("kernel-b", 2), ("kernel-c", None)):
        d = tmp_path / n
        d.mkdir()
        (d / "bzImage").write_bytes(_section_bytes(eif0, eif0.kernel))
        (d / "nsm.ko").write_bytes(boot0["nsm.ko"].data + n.encode())
        (d / "build-info.json").write_text(json.dumps({"kernelrelease": f"6.12-{n}"}))
        if stamp is not None:  # kernel-c is an unfinished build: never picked
            (d / ".complete").write_text("done\n")
            import os
            os.utime(d / ".complete", (stamp, stamp))
    recipe = tmp_path / "prebuilt.yaml"
    recipe.write_text("name: test-prebuilt\nkernel:\n  directory: kernel-*\n"
                      "rootfs:\n  debs: [busybox-static]\n  busybox_links: true\n")
    img = recipes.build(recipe)
    try:
        eif = read_eif(img.path)
        boot = {r.name: r for r in read_cpio(_section_bytes(eif, eif.ramdisks[0]))}
        # nitro-cli's bootstrap ramdisk (docs/boot.md#bootstrap-ramdisk)
        assert set(boot) == {"dev", "init", "nsm.ko"}
        assert boot["nsm.ko"].data == boot0["nsm.ko"].data + b"kernel-b"
        assert img.info["Kernel"]["release"] == "6.12-kernel-b"
        assert img.info["Kernel"]["directory"] == str(tmp_path / "kernel-b")
        assert eif.metadata["BuildMetadata"]["KernelVersion"] == "6.12-kernel-b"
    finally:
        _forget(img)
    bad = tmp_path / "bad.yaml"
    bad.write_text("kernel:\n  directory: kernel-*\n  modules: [vsock]\n")
    with pytest.raises(NitroError) as e:
        recipes.load_recipe(bad)
    assert "kernel.modules" in e.value.message


def test_cache_keeps_the_newest_builds_per_recipe(hello, tmp_path):
    recipe = _copy_recipe(tmp_path, "test-prune")
    built = [recipes.build(recipe, cmd=[f"/bin/true-{i}"]) for i in range(recipes.KEEP_BUILDS + 1)]
    try:
        present = [Path(b.info["EifPath"]).is_file() for b in built]
        assert present == [False] + [True] * recipes.KEEP_BUILDS  # the oldest went
        assert not Path(built[0].info["EifPath"]).with_suffix(".json").exists()
    finally:
        for b in built:
            _forget(b)
