"""A vhost-user back end in Python: QEMU is the front end, the harness serves the device.

docs/vhost-user.md is the contract. QEMU connects to a Unix socket the back end listens on
(``-chardev socket,id=X,path=...``), negotiates features, hands over guest RAM as memfd regions
(SCM_RIGHTS) and one kick and one call eventfd per virtqueue. The back end maps the regions,
walks split virtqueues in that shared memory and lets a :class:`VirtioDevice` model consume and
produce buffers. Everything runs on one event-loop thread per back end (``selectors``/epoll over
the vhost-user socket, the kick eventfds and any fds the device registers), so device models
need no locks for their own state.

Public pieces (import them from here):

- :class:`VirtioDevice` (``device``): the device-model interface (vsock, NSM).
- :class:`VhostUserBackend` (``backend``): socket, connection, rings, stop and teardown; the
  messages it serves are ``dispatch``'s table, its thread runs ``loop``'s :class:`EventLoop`.
- :class:`MemoryTable` (``memory``): guest-physical and QEMU-virtual address translation.
- :class:`VirtQueue` / :class:`DescriptorChain` (``virtqueue``): split-ring access (virtio 1.x
  section 2.7, which legacy virtio-mmio shares byte for byte).
- ``protocol``: request codes, feature bits, message structs, :class:`VhostUserError`.
"""

from __future__ import annotations

from harness.vhost_user.backend import VhostUserBackend
from harness.vhost_user.device import VirtioDevice
from harness.vhost_user.memory import MemoryRegion, MemoryTable
# REQUEST_NAMES and the VRING_* flags stay importable from here, as before the split.
from harness.vhost_user.protocol import (  # noqa: F401
    REQUEST_NAMES,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    ProtocolFeature,
    Request,
    VhostUserError,
)
from harness.vhost_user.chain_walk import (  # noqa: F401
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from harness.vhost_user.virtqueue import (  # noqa: F401
    VRING_AVAIL_F_NO_INTERRUPT,
    ChainTooLarge,
    DescriptorChain,
    VirtQueue,
)

__all__ = [
    "VirtioDevice",
    "VhostUserBackend",
    "VhostUserError",
    "MemoryTable",
    "MemoryRegion",
    "VirtQueue",
    "DescriptorChain",
    "ChainTooLarge",
    "Request",
    "ProtocolFeature",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_INDIRECT_DESC",
]
