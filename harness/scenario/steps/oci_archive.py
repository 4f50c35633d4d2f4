"""``oci_archive``: assemble an OCI image-layout tarball without Docker, for ``build-enclave``.

Layer 1 is the root filesystem of a recipe's image (``base``, built and cached), layer 2 the
``pip`` wheels (pinned, fetched from PyPI and cached, installed with ``pip install --target``)
and the ``files`` (from the scenario's folder or inline) - what a Dockerfile ``FROM base``,
``RUN pip install``, ``COPY`` would give (harness.images.oci_archive). A ``cli`` step then
builds the EIF with ``build-enclave --docker-archive``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.scenario.errors import StepFailed
from harness.scenario.steps.registry import StepCall, register

if TYPE_CHECKING:
    from harness.scenario.runner import ScenarioRunner


def label(body: dict[str, Any]) -> str:
    """The archive's file name."""
    return Path(str(body.get("output", ""))).name


def run(runner: ScenarioRunner, call: StepCall) -> None:
    """Write the archive at ``output`` (relative: in the artifacts folder). StepFailed naming
    the file entry when a ``source`` cannot be read; the builders' NitroError otherwise."""
    from harness.enclave_factory import resolve_eif
    from harness.images.oci_archive import ImageFile, build_oci_archive
    from harness.images.rootfs import fetch_wheel

    body = call.body
    out = Path(body["output"])
    out = out if out.is_absolute() else runner.artifacts_dir / out
    files = []
    for index, item in enumerate(body.get("files") or []):
        if "source" in item:
            source = Path(item["source"])
            source = source if source.is_absolute() else runner.scenario.path.parent / source
            try:
                data = source.read_bytes()
            except OSError as err:
                raise StepFailed(f"files[{index}].source: {source}: {err.strerror or err}") from None
        else:
            data = str(item["content"]).encode()
        files.append(ImageFile(str(item["path"]), data, int(item.get("mode", 0o644))))
    base = resolve_eif(image=body["base"]) if body.get("base") else None
    wheels = [fetch_wheel(spec) for spec in body.get("pip") or []]
    lines: list[str] = []
    digest = build_oci_archive(
        out, base=base, files=files, wheels=wheels,
        pip_target=str(body.get("pip_target", "/usr/lib/python3/dist-packages")),
        cmd=body.get("cmd"), env=body.get("env") or [], tag=str(body.get("tag", "app:latest")),
        log=lines.append)
    with open(runner.artifacts_dir / "oci_archive.log", "a", encoding="utf-8") as log:
        log.write(f"{out}: manifest {digest}\n" + "".join(f"  {line}\n" for line in lines))


STEP = register("oci_archive", needs_enclave=False, label=label, run=run)
