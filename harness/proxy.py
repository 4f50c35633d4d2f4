"""vsock-proxy: the parent's byte pipe from an enclave's vsock port to an allowlisted TCP server.

As nitro-cli's ``vsock_proxy`` (docs/kms.md#vsock-proxy): ``vsock-proxy [-4|-6] [-w N] [--config
FILE] <local_port> <remote_addr> <remote_port>``. The YAML config holds ``allowlist:``, a list of
``{address, port}``; the destination must be on it or the proxy refuses to start. Matching, as
nitro-cli: the port must be equal, then the address string equal to ``remote_addr`` or one of the
entry's resolved IPs equal to ``remote_addr``'s resolved IP. The proxy listens on the parent (CID
3), accepts up to ``num_workers`` connections at a time (later ones wait), opens a TCP connection
to the destination per client and copies bytes both ways; TLS stays end to end.

In the harness the listener is the vsock device's parent endpoint (``device.listen(port)``,
whose ``accept(timeout)`` returns a connected ``socket.socket``); anything with such an
``accept`` works, and so does a plain listening ``socket.socket`` (TCP or Unix), which is how
the unit tests drive it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import selectors
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

import yaml

from harness.errors import ErrorCode, NitroError

__all__ = [
    "DEFAULT_CONFIG",
    "AllowlistEntry",
    "load_allowlist",
    "check_allowlist",
    "VsockProxy",
]

log = logging.getLogger("harness.proxy")

#: nitro-cli's default ``--config``.
DEFAULT_CONFIG = "/etc/nitro_enclaves/vsock-proxy.yaml"
#: nitro-cli's default ``-w``.
DEFAULT_WORKERS = 4
_BUFFER = 8192
_ACCEPT_POLL_S = 0.2


@dataclass(frozen=True)
class AllowlistEntry:
    """One ``allowlist`` item: ``address`` (host name or IP literal) and TCP ``port``."""

    address: str
    port: int


def load_allowlist(path: str | os.PathLike) -> list[AllowlistEntry]:
    """Read a vsock-proxy YAML config and return its ``allowlist`` entries.

    Raises :class:`NitroError` (E19 unreadable file, E03 bad content) naming the file, the
    entry and the field: ``allowlist`` must be a list of mappings with a string ``address``
    and an integer ``port`` in 1..65535.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise NitroError(
            ErrorCode.FileOperationFailure, f"vsock-proxy config {path}: cannot read ({err.strerror})"
        ) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise NitroError(
            ErrorCode.InvalidArgument, f"vsock-proxy config {path}: bad YAML ({err})".replace("\n", " ")
        ) from None
    if not isinstance(doc, dict) or "allowlist" not in doc:
        raise NitroError(ErrorCode.InvalidArgument, f"vsock-proxy config {path}: no 'allowlist' field")
    return parse_allowlist(doc["allowlist"], source=str(path))


def parse_allowlist(items: Any, source: str = "allowlist") -> list[AllowlistEntry]:
    """Check a YAML/JSON-like ``allowlist`` value (list of {address, port}); see
    :func:`load_allowlist` for the rules and errors."""
    if not isinstance(items, list):
        raise NitroError(
            ErrorCode.InvalidArgument, f"vsock-proxy config {source}: 'allowlist' must be a list"
        )
    out = []
    for index, item in enumerate(items):
        if isinstance(item, AllowlistEntry):
            out.append(item)
            continue
        where = f"vsock-proxy config {source}: allowlist[{index}]"
        if not isinstance(item, Mapping):
            raise NitroError(ErrorCode.InvalidArgument, f"{where}: must be a mapping with address and port")
        address, port = item.get("address"), item.get("port")
        if not isinstance(address, str) or not address:
            raise NitroError(ErrorCode.InvalidArgument, f"{where}.address: must be a host name or IP address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise NitroError(
                ErrorCode.InvalidArgument, f"{where}.port: must be an integer 1..65535, got {port!r}"
            )
        out.append(AllowlistEntry(address, port))
    return out


def _family(ip_version: int | None) -> int:
    return {None: socket.AF_UNSPEC, 4: socket.AF_INET, 6: socket.AF_INET6}[ip_version]


def resolve(host: str, ip_version: int | None = None) -> list[str]:
    """IP addresses of ``host`` (IPv4 only with 4, IPv6 only with 6, both with None).

    Raises NitroError E03 when the name does not resolve to an address of that family.
    """
    try:
        infos = socket.getaddrinfo(host, None, _family(ip_version), socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise NitroError(
            ErrorCode.InvalidArgument, f"vsock-proxy: cannot resolve {host!r} ({err.strerror})"
        ) from None
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise NitroError(ErrorCode.InvalidArgument, f"vsock-proxy: {host!r} has no IPv{ip_version} address")
    return addresses


def check_allowlist(
    remote_addr: str,
    remote_port: int,
    allowlist: Iterable[AllowlistEntry],
    ip_version: int | None = None,
) -> str:
    """Return the IP the proxy will connect to if ``remote_addr:remote_port`` is allowed.

    nitro-cli's rule: an entry matches when its port equals ``remote_port`` and its address
    equals ``remote_addr`` as a string, or one of its resolved IPs equals ``remote_addr``'s
    first resolved IP. Raises NitroError E03 "... is not in the allowlist" otherwise.
    """
    entries = list(allowlist)
    target_ip = resolve(remote_addr, ip_version)[0]
    for entry in entries:
        if entry.port != remote_port:
            continue
        if entry.address == remote_addr:
            return target_ip
        try:
            candidates = resolve(entry.address, ip_version)
        except NitroError:
            continue
        if any(ipaddress.ip_address(c) == ipaddress.ip_address(target_ip) for c in candidates):
            return target_ip
    listed = ", ".join(f"{e.address}:{e.port}" for e in entries) or "empty"
    raise NitroError(
        ErrorCode.InvalidArgument,
        f"vsock-proxy: {remote_addr}:{remote_port} is not in the allowlist ({listed}); "
        "the given address and port are not allowed",
    )


class VsockProxy:
    """Forward connections accepted from ``listener`` to ``remote_addr:remote_port`` over TCP.

    ``listener``: a listening ``socket.socket`` (TCP/Unix, for tests) or an object whose
    ``accept(timeout)`` returns a connected socket (or ``(socket, address)``) or None on
    timeout, such as the harness vsock device's parent listener.
    ``allowlist``: entries, a list of {address, port} mappings, or a YAML config path; the
    destination is checked at construction (NitroError E03 when it is not allowed, as
    nitro-cli refuses to start). None skips the check (library use only; the CLI always
    applies a config).
    ``ip_version``: 4, 6 or None (nitro-cli's ``-4``/``-6``); ``num_workers``: simultaneous
    connections (``-w``, default 4); ``owns_listener``: close the listener on :meth:`stop`;
    ``on_event``: called with one line of text per connection event (accepted, upstream
    unreachable, closed), for a log the caller keeps.

    :meth:`start` serves in a daemon thread; :meth:`stop` closes every connection; usable as a
    context manager. ``connections`` counts accepted connections.
    """

    def __init__(
        self,
        listener: Any,
        remote_addr: str,
        remote_port: int,
        *,
        allowlist: Sequence[AllowlistEntry | Mapping[str, Any]] | str | os.PathLike | None = None,
        ip_version: int | None = None,
        num_workers: int = DEFAULT_WORKERS,
        owns_listener: bool = False,
        on_event: Callable[[str], None] | None = None,
    ):
        if ip_version not in (None, 4, 6):
            raise NitroError(
                ErrorCode.InvalidArgument, f"vsock-proxy: ip_version must be 4, 6 or None, got {ip_version!r}"
            )
        if not isinstance(remote_port, int) or not 0 < remote_port < 65536:
            raise NitroError(
                ErrorCode.InvalidArgument, f"vsock-proxy: remote port must be 1..65535, got {remote_port!r}"
            )
        if num_workers < 1:
            raise NitroError(
                ErrorCode.InvalidArgument,
                f"vsock-proxy: number of workers must be at least 1, got {num_workers}",
            )
        if allowlist is not None:
            if isinstance(allowlist, (str, os.PathLike)):
                entries = load_allowlist(allowlist)
            else:
                entries = parse_allowlist(list(allowlist))
            check_allowlist(remote_addr, remote_port, entries, ip_version)
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self.ip_version = ip_version
        self.num_workers = num_workers
        self.connections = 0
        self._on_event = on_event or (lambda text: None)
        self._listener = listener
        self._owns_listener = owns_listener
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @classmethod
    def on_vsock(
        cls, device: Any, local_port: int, remote_addr: str, remote_port: int, **kwargs: Any
    ) -> VsockProxy:
        """A proxy listening on the parent's vsock ``local_port`` via ``device.listen(port)``
        (the harness vsock device); the proxy owns and closes that listener. Keyword
        arguments as the constructor. The allowlist is checked before listening."""
        if kwargs.get("allowlist") is not None:
            allowlist = kwargs["allowlist"]
            entries = (
                load_allowlist(allowlist)
                if isinstance(allowlist, (str, os.PathLike))
                else parse_allowlist(list(allowlist))
            )
            check_allowlist(remote_addr, remote_port, entries, kwargs.get("ip_version"))
            kwargs["allowlist"] = entries
        return cls(device.listen(local_port), remote_addr, remote_port, owns_listener=True, **kwargs)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> VsockProxy:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._stop.clear()
            self._pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="vsock-proxy")
            self._thread = threading.Thread(target=self._accept_loop, name="vsock-proxy-accept", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close open connections (and the listener if owned); idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            for sock in list(self._open):
                _close(sock)
            self._open.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if self._owns_listener:
            close = getattr(self._listener, "close", None)
            if close is not None:
                try:
                    close()
                except OSError:
                    pass

    def serve_forever(self) -> None:
        """Start and block until :meth:`stop` is called from elsewhere or Ctrl-C."""
        self.start()
        try:
            while not self._stop.is_set():
                self._stop.wait(1.0)
        finally:
            self.stop()

    def __enter__(self) -> VsockProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- work ------------------------------------------------------------------------------------

    def _accept_one(self) -> socket.socket | None:
        listener = self._listener
        try:
            if isinstance(listener, socket.socket):
                listener.settimeout(_ACCEPT_POLL_S)
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            result = listener.accept(_ACCEPT_POLL_S)
        except TimeoutError:
            return None
        if isinstance(result, tuple):
            result = result[0]
        return result

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self._accept_one()
            except OSError as err:
                if getattr(self._listener, "closed", False) is True:
                    # The vsock device closed its listeners: the enclave ended, nothing failed.
                    self._on_event("listener closed (the enclave ended)")
                elif not self._stop.is_set():
                    log.warning("vsock-proxy: listener failed (%s); stopping", err)
                return
            if conn is None:
                continue
            self.connections += 1
            self._on_event(f"connection {self.connections} accepted")
            with self._lock:
                self._open.add(conn)
            pool = self._pool
            if pool is None:
                _close(conn)
                return
            try:
                pool.submit(self._serve, conn, self.connections)
            except RuntimeError:  # pool shut down while stopping
                _close(conn)

    def _serve(self, client: socket.socket, number: int) -> None:
        try:
            if self._stop.is_set():
                return
            try:
                address = resolve(self.remote_addr, self.ip_version)[0]
                upstream = socket.create_connection((address, self.remote_port), timeout=30)
                upstream.settimeout(None)
            except (OSError, NitroError) as err:
                log.warning(
                    "vsock-proxy: cannot connect to %s:%s (%s)", self.remote_addr, self.remote_port, err
                )
                self._on_event(f"connection {number}: cannot connect to "
                               f"{self.remote_addr}:{self.remote_port} ({err})")
                return
            with self._lock:
                self._open.add(upstream)
            try:
                _pump(client, upstream, self._stop)
            finally:
                with self._lock:
                    self._open.discard(upstream)
                _close(upstream)
        finally:
            with self._lock:
                self._open.discard(client)
            _close(client)
            self._on_event(f"connection {number} closed")


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _pump(a: socket.socket, b: socket.socket, stop: threading.Event) -> None:
    """Copy bytes both ways until both directions reached end of file (half-close kept:
    an EOF from one side becomes ``shutdown(SHUT_WR)`` towards the other)."""
    peer = {a: b, b: a}
    open_reads = {a, b}
    with selectors.DefaultSelector() as selector:
        for sock in open_reads:
            selector.register(sock, selectors.EVENT_READ)
        while open_reads and not stop.is_set():
            for key, _ in selector.select(timeout=0.5):
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = src.recv(_BUFFER)
                except (ConnectionError, OSError):
                    return  # reset: drop both sides
                if data:
                    try:
                        peer[src].sendall(data)
                    except OSError:
                        return
                    continue
                selector.unregister(src)
                open_reads.discard(src)
                try:
                    peer[src].shutdown(socket.SHUT_WR)
                except OSError:
                    return
