"""Container image tarballs for tests, made with tarfile in the exact layouts Docker (``docker
save``) and OCI (image layout) define: two layers with a whiteout and an opaque directory, and
an image config with Env, Cmd and Entrypoint."""

import gzip
import hashlib
import io
import json
import tarfile


def tar_bytes(members, *, gz=False):
    """members: list of (name, kind, payload/linkname, extra dict)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind, payload, extra in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = extra.get("mtime", 1600000000)
            ti.uid, ti.gid = extra.get("uid", 0), extra.get("gid", 0)
            ti.mode = extra.get("mode", 0o644)
            data = None
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, extra.get("mode", 0o755)
            elif kind == "file":
                data = payload
                ti.size = len(data)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, payload
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, payload
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, payload[0], payload[1]
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


LAYER1 = [
    ("bin", "dir", None, {}),
    ("bin/app", "file", b"#!/bin/sh\necho one\n", {"mode": 0o755, "uid": 1000, "gid": 50}),
    ("bin/app-hard", "hard", "bin/app", {}),
    ("etc", "dir", None, {}),
    ("etc/hostname", "file", b"builder\n", {}),
    ("etc/old.conf", "file", b"old", {}),
    ("data", "dir", None, {}),
    ("data/lower1", "file", b"l1", {}),
    ("data/lower2", "file", b"l2", {}),
    ("dev", "dir", None, {}),
    ("dev/null", "chr", (1, 3), {"mode": 0o666}),
    (".dockerenv", "file", b"", {}),
]


LAYER2 = [
    ("etc/.wh.old.conf", "file", b"", {}),
    ("data/.wh..wh..opq", "file", b"", {}),
    ("data/upper", "file", b"u", {}),
    ("bin/app", "file", b"#!/bin/sh\necho two\n", {"mode": 0o755, "uid": 1000, "gid": 50}),
]


CONFIG = {"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
          "config": {"Env": ["PATH=/bin", "MODE=test"], "Cmd": ["/bin/app", "--flag"],
                     "Entrypoint": ["/bin/entry"]}}


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def oci_tarball(config=CONFIG, layers=(LAYER1, LAYER2), nested_index=False, zstd=False):
    blobs = {}
    layer_descs = []
    for i, lay in enumerate(layers):
        raw = tar_bytes(lay, gz=(i == 0))  # one gzip layer, one plain layer
        blobs[digest(raw)] = raw
        mt = ("application/vnd.oci.image.layer.v1.tar+zstd" if zstd else
              "application/vnd.oci.image.layer.v1.tar+gzip" if i == 0 else
              "application/vnd.oci.image.layer.v1.tar")
        layer_descs.append({"mediaType": mt, "digest": digest(raw), "size": len(raw)})
    cfg = json.dumps(config).encode()
    blobs[digest(cfg)] = cfg
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": digest(cfg), "size": len(cfg)},
                      "layers": layer_descs}).encode()
    blobs[digest(man)] = man
    top = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(man),
           "size": len(man), "annotations": {"org.opencontainers.image.ref.name": "demo:1"}}
    if nested_index:
        idx = json.dumps({"schemaVersion": 2, "manifests": [
            {**top, "platform": {"os": "linux", "architecture": "arm64"},
             "digest": digest(b"missing")},
            {**top, "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
        blobs[digest(idx)] = idx
        top = {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest(idx),
               "size": len(idx)}
    files = [("oci-layout", "file", b'{"imageLayoutVersion":"1.0.0"}', {}),
             ("index.json", "file", json.dumps({"schemaVersion": 2, "manifests": [top]}).encode(), {})]
    files.append(("blobs", "dir", None, {}))
    files.append(("blobs/sha256", "dir", None, {}))
    for d, b in blobs.items():
        files.append((f"blobs/sha256/{d.split(':')[1]}", "file", b, {}))
    return tar_bytes(files)


def docker_save_tarball(config=CONFIG, layers=(LAYER1, LAYER2)):
    cfg = json.dumps(config).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    files = [(cfg_name, "file", cfg, {})]
    names = []
    for i, lay in enumerate(layers):
        raw = tar_bytes(lay)
        d = f"layer{i}"
        files += [(d, "dir", None, {}), (f"{d}/layer.tar", "file", raw, {})]
        names.append(f"{d}/layer.tar")
    manifest = [{"Config": cfg_name, "RepoTags": ["demo:latest"], "Layers": names}]
    files.append(("manifest.json", "file", json.dumps(manifest).encode(), {}))
    return tar_bytes(files), "sha256:" + cfg_name[:-5]
