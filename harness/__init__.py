"""nitro-harness: run AWS Nitro Enclave images (EIF files) in QEMU microVMs as Nitro would.

Modules, one concept each (see README "Architecture"): ``eif``, ``cpio``, ``images``, ``qemu``,
``vhost_user``, ``vsock``, ``nsm``, ``pki``, ``attestation``, ``kms``, ``proxy``, ``enclave``,
``scenario``, ``cli``, ``pytest_plugin``. Errors users see are :class:`harness.errors.NitroError`.
"""

__version__ = "0.1.0"
