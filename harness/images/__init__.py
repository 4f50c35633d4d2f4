"""Building the pieces of an enclave image: ramdisks, nitro-cli blob directories, image tarballs.

SPEC 3 describes what nitro-cli puts in the two ramdisks. ``ramdisk`` builds them
deterministically (same inputs, same bytes, same PCRs); ``blobs`` finds nitro-cli's blob
directory (kernel, cmdline, init, nsm.ko); ``docker_archive`` turns a ``docker save`` or OCI
image-layout tarball into a root filesystem plus Cmd/Env. Recipes for the images the harness
ships live beside them.
"""
