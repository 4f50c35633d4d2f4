"""The vsock-proxies of a scenario's ``services: vsock_proxy:`` list, and of ``kms`` steps.

Each entry is what ``vsock-proxy PORT HOST RPORT --config FILE`` is on a Nitro parent
(docs/kms.md#vsock-proxy): the parent's vsock ``port`` forwarded to ``remote`` (``kms``: the
scenario's KMS emulator; or ``host:port``), which must be on the ``allowlist`` (checked when the
services start, as nitro-cli's proxy refuses to start). On Nitro one proxy serves every enclave
of the parent; here every enclave has its own vsock device, so :meth:`VsockProxyService.attach`
puts a listener on each enclave's device before its QEMU starts. Connection events go to
``vsock-proxy-<port>.log``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import NitroError

if TYPE_CHECKING:
    from harness.proxy import AllowlistEntry, VsockProxy
    from harness.scenario.services.kms import KmsEmulator


class ProxyServiceError(Exception):
    """A proxy entry that cannot work: ``at`` (path below the entry) and a one-line ``message``."""

    def __init__(self, at: list[Any], message: str):
        super().__init__(message)
        self.at = at
        self.message = message


class VsockProxyService:
    """One ``vsock_proxy`` entry: ``port`` (parent vsock port), ``remote`` (``kms`` or
    ``host:port``), ``allowlist`` (``{address, port}`` mappings or ``kms``; default: the
    remote alone), ``workers`` (connections served at once, default 4). ``kms`` is the
    scenario's emulator (needed by ``kms`` remotes); the log goes to ``folder``.
    """

    def __init__(self, spec: Mapping[str, Any], folder: Path, kms: KmsEmulator | None = None):
        self.port = int(spec["port"])
        self.spec = dict(spec)
        self.folder = Path(folder)
        self.kms = kms
        self.workers = int(spec.get("workers", 4))
        self.proxies: list[VsockProxy] = []
        self.remote_host = ""
        self.remote_port = 0
        self.allowlist: list[AllowlistEntry] = []
        self._lock = threading.Lock()

    def check(self) -> None:
        """Resolve the remote and apply the allowlist now, before any enclave boots.

        Raises :class:`ProxyServiceError` naming ``remote`` or ``allowlist``.
        """
        from harness.proxy import AllowlistEntry, check_allowlist, parse_allowlist

        self.remote_host, self.remote_port = self._address(self.spec["remote"], ["remote"])
        entries = []
        for index, item in enumerate(self.spec.get("allowlist") or [self.spec["remote"]]):
            if isinstance(item, str):
                entries.append(AllowlistEntry(*self._address(item, ["allowlist", index])))
            else:
                try:
                    entries += parse_allowlist([dict(item)], source=f"allowlist[{index}]")
                except NitroError as err:
                    raise ProxyServiceError(["allowlist", index], err.message) from None
        try:
            check_allowlist(self.remote_host, self.remote_port, entries)
        except NitroError as err:
            raise ProxyServiceError(["allowlist"], err.message) from None
        self.allowlist = entries
        self.folder.mkdir(parents=True, exist_ok=True)
        self._log(f"vsock port {self.port} -> {self.remote_host}:{self.remote_port} "
                  f"(allowlist {', '.join(f'{e.address}:{e.port}' for e in entries)})")

    def _address(self, text: str, at: list[Any]) -> tuple[str, int]:
        """``kms`` -> the emulator's address; ``host:port`` -> (host, port)."""
        if text == "kms":
            if self.kms is None or self.kms.server is None:
                raise ProxyServiceError(at, "'kms' needs a running services.kms emulator")
            return "127.0.0.1", self.kms.port
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ProxyServiceError(at, f"{text!r} is not 'kms' or host:port")
        return host.strip("[]"), int(port)

    def attach(self, device: Any) -> VsockProxy:
        """Listen on ``device``'s parent ``port`` and forward to the remote; returns the
        started proxy. Raises NitroError when the port is taken on that device."""
        from harness.proxy import VsockProxy

        cid = getattr(device, "guest_cid", "?")
        proxy = VsockProxy.on_vsock(device, self.port, self.remote_host, self.remote_port,
                                    allowlist=self.allowlist, num_workers=self.workers,
                                    on_event=lambda text: self._log(f"CID {cid}: {text}"))
        proxy.start()
        with self._lock:
            self.proxies.append(proxy)
        self._log(f"CID {cid}: listening on vsock port {self.port}")
        return proxy

    def stop(self) -> None:
        """Stop every proxy started by :meth:`attach` (idempotent)."""
        with self._lock:
            proxies, self.proxies = self.proxies, []
        for proxy in proxies:
            proxy.stop()
        if proxies:
            self._log(f"stopped ({sum(p.connections for p in proxies)} connections in all)")

    def _log(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with self._lock, open(self.folder / f"vsock-proxy-{self.port}.log", "a",
                              encoding="utf-8") as out:
            out.write(f"{stamp} {text}\n")


__all__ = ["ProxyServiceError", "VsockProxyService"]
