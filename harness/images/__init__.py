"""Building the pieces of an enclave image: ramdisks, nitro-cli blob directories, image tarballs.

docs/boot.md describes what nitro-cli puts in the two ramdisks. ``ramdisk`` builds them
deterministically (same inputs, same bytes, same PCRs); ``blobs`` finds nitro-cli's blob
directory (kernel, cmdline, init, nsm.ko), ``own_blobs`` gives the harness's own in its place
and exports them; ``docker_archive`` turns a ``docker save`` or OCI
image-layout tarball into a root filesystem plus Cmd/Env; ``debian`` fetches and unpacks
Debian packages. Building the images the harness ships from their recipes: ``recipe``
(loading and validating recipe files), ``static_programs`` (init, nsm-pcr), ``kernel``,
``rootfs``, ``cache`` (the input-hash image cache) and ``recipes``, the front
(``build_image``) that also re-exports their public names. For an image of another
architecture than the host's (arm64 on x86_64): ``apt_state`` (a private apt state for its
packages) and ``host_twin`` (running its busybox and python through the host's builds).
"""
