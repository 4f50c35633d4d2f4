"""The set-up's build steps: the patched QEMU and the Nitro-style kernel, each built once.

Both run the shell build scripts shipped as package data (:func:`harness.assets.build_script`)
with ``bash``, pointing them at the shipped patches and kernel configuration:

- ``qemu``: ``build-qemu.sh`` builds Debian's qemu 10.0 source with ``harness/data/qemu-patches``
  into ``<cache>/qemu-<version>-<patch hash>/`` (docs/architecture.md#qemu-build); a complete
  build is reused. ``$NITRO_HARNESS_QEMU`` (any executable) replaces the build.
- ``kernel``: ``build-kernel.sh`` builds linux-source-6.12 twice: for x86_64 with
  ``harness/data/kernel/nitro.config`` into ``<cache>/kernel-<version>-<config hash>/``, pointing
  ``<cache>/kernel-current`` at it, then for aarch64 (cross-built) with ``nitro-arm64.config`` into
  ``<cache>/kernel-arm64-<version>-<config hash>/`` and ``<cache>/kernel-arm64-current``
  (docs/boot.md#enclave-kernels); ``SKIP_KERNEL=1`` skips both.
"""

from __future__ import annotations

import os

from harness import assets
from harness.arch import ARCHES
from harness.qemu.find import patch_hash
from harness.setup.apt import QEMU_VERSION
from harness.setup.context import Context, StepFailed


def qemu_build_dir(ctx: Context) -> str:
    """Where build-qemu.sh installs the QEMU of the shipped patches (the folder its
    ``--print-dir`` prints): ``<cache>/qemu-<version>-<patch hash>``."""
    version = ctx.env.get("QEMU_VERSION", QEMU_VERSION)
    wanted = patch_hash(assets.qemu_patches_dir())
    if wanted is None:
        raise StepFailed(f"no patches in {assets.qemu_patches_dir()} (a broken install?)")
    return str(ctx.cache / f"qemu-{version}-{wanted}")


def _script_env(ctx: Context) -> dict[str, str]:
    return {**ctx.env, "JOBS": ctx.env.get("JOBS", "2"), "PYTHON": ctx.python,
            "NITRO_HARNESS_QEMU_PATCHES": str(assets.qemu_patches_dir()),
            "NITRO_HARNESS_KERNEL_CONFIG": str(assets.kernel_config())}


def step_qemu(ctx: Context) -> None:
    """Build the patched QEMU unless a complete build exists (or ``$NITRO_HARNESS_QEMU`` is set:
    it must name an executable file)."""
    explicit = ctx.env.get("NITRO_HARNESS_QEMU")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise StepFailed(f"NITRO_HARNESS_QEMU={explicit} is not an executable file")
        ctx.log(f"cached: NITRO_HARNESS_QEMU={explicit} (no build)")
        return
    prefix = qemu_build_dir(ctx)
    # Both binaries: a build made before aarch64 was added is rebuilt.
    binaries = [os.path.join(prefix, "bin", arch.qemu_binary) for arch in ARCHES.values()]
    if os.path.isfile(os.path.join(prefix, ".complete")) and \
            all(os.access(b, os.X_OK) for b in binaries):
        ctx.log(f"cached: {', '.join(binaries)}")
        return
    if ctx.dry_run:
        ctx.log(f"would build QEMU into {prefix} (build-qemu.sh, 5-15 min on 2 cores)")
        return
    ctx.need_apt()
    script = assets.build_script("build-qemu.sh")
    ctx.run(["bash", str(script)], f"{script}", env=_script_env(ctx))


#: The kernels the kernel step builds, in order: ``KERNEL_ARCH`` for build-kernel.sh (the names of
#: harness.arch) and the configuration fragment in ``harness/data/kernel``.
KERNELS = (("x86_64", "nitro.config"), ("aarch64", "nitro-arm64.config"))


def kernel_fragment(arch: str) -> str:
    """The shipped configuration fragment of the kernel for ``arch`` (a :data:`KERNELS` name)."""
    return str(assets.kernel_config().with_name(dict(KERNELS)[arch]))


def step_kernel(ctx: Context) -> None:
    """Build the Nitro-style kernels the shipped ``hello`` and ``python`` images boot, x86_64
    then aarch64 (the script itself says "cached" for an unchanged configuration and source
    version)."""
    if ctx.flag("SKIP_KERNEL"):
        ctx.log("skipped (SKIP_KERNEL=1; the hello and python images need it, the *-debian ones "
                "do not)")
        return
    script = assets.build_script("build-kernel.sh")
    if ctx.dry_run:
        for arch, _ in KERNELS:
            ctx.log(f"would run KERNEL_ARCH={arch} bash {script} (reuses a cached build of the "
                    "same configuration)")
        return
    ctx.need_apt()
    for arch, _ in KERNELS:
        env = {**_script_env(ctx), "KERNEL_ARCH": arch,
               "NITRO_HARNESS_KERNEL_CONFIG": kernel_fragment(arch)}
        ctx.run(["bash", str(script)], f"KERNEL_ARCH={arch} {script}", env=env)
