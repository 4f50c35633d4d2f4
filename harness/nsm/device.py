"""The NSM as a virtio device (ID 33, one queue) served over vhost-user.

docs/nsm.md#device and docs/vhost-user.md#generic-device: QEMU attaches it with
``-device vhost-user-device,virtio-id=33,chardev=...,num_vqs=1,vq_size=N`` (a QEMU whose
vhost-user-device is user-creatable); the guest's upstream Linux ``nsm`` driver binds to it and
creates /dev/nsm. Per command that driver makes TWO descriptor chains available, the request
(device-readable, at most 0x1000 bytes) first and then the 0x3000-byte response buffer
(device-writable); the device returns both, the request with length 0 and the response with its
CBOR length. A chain carrying both parts (as other drivers may send) is answered in place. The
driver's hwrng issues GetRandom at boot.

Do not offer the CONFIG protocol feature for this device (QEMU warns that vhost-user-device
does not support it): create the back end with ``offer_config=False``.

Requests are handled one at a time, in order, on a worker thread, so signing (milliseconds)
and injected delays never stall the vhost-user loop (which must keep answering QEMU, e.g.
GET_VRING_BASE on stop); the used ring is only touched on the loop thread.

Bounds (docs/vhost-user.md#bounds): a request's length is checked against 0x1000 before any
byte is copied (a longer one is answered InputTooLarge from its length alone, docs/nsm.md#errors),
and what waits for the worker is at most one request per ring entry (the device holds those
heads), so at most queue size x 0x1000 bytes.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque

from harness.nsm.api import Nsm
from harness.nsm.codec import encode_response
from harness.nsm.messages import MAX_REQUEST_SIZE, ErrorResponse, NsmErrorCode
from harness.vhost_user import DescriptorChain, VhostUserBackend, VirtioDevice

#: virtio device ID of the Nitro Secure Module (docs/nsm.md#device).
NSM_DEVICE_ID = 33


class NsmDevice(VirtioDevice):
    """Virtio device model for :class:`harness.nsm.Nsm` (device ID 33, one queue).

    ``nsm`` answers each request's bytes. ``requests`` counts requests answered. Callbacks run
    on the back end's loop thread; :meth:`harness.nsm.Nsm.handle` runs on one worker thread.
    """

    device_id = NSM_DEVICE_ID
    num_queues = 1
    queue_names = ("request",)
    #: Largest ring accepted; QEMU's ``vq_size`` picks the actual size.
    queue_size = 1024
    device_features = 0

    def __init__(self, nsm: Nsm):
        self.nsm = nsm
        self.requests = 0
        self._request_chain: DescriptorChain | None = None  # a request awaiting its buffer
        self._inflight: deque[tuple[int, DescriptorChain | None, DescriptorChain]] = deque()
        self._generation = 0
        #: Exceptions the NSM model raised while answering (bounded; the guest got InternalError).
        self.worker_errors: deque[str] = deque(maxlen=16)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- VirtioDevice callbacks (loop thread) -------------------------------------------------

    def on_start(self, backend: VhostUserBackend) -> None:
        """Keep the back end; start the worker thread."""
        super().on_start(backend)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsm-worker")

    def on_kick(self, queue_index: int) -> None:
        """Pair request and response chains as the Linux driver queues them and submit each
        pair to the worker."""
        if queue_index != 0 or self.backend is None:
            return
        queue = self.backend.queues[0]
        while (chain := queue.pop()) is not None:
            if chain.readable_len and chain.writable_len:
                self._submit(None, chain, _request_bytes(chain))
            elif chain.readable_len:
                if self._request_chain is not None:
                    # Two requests in a row: the first never got a buffer; give it back empty.
                    queue.push(self._request_chain, 0)
                self._request_chain = chain
            elif chain.writable_len and self._request_chain is not None:
                request, self._request_chain = self._request_chain, None
                self._submit(request, chain, _request_bytes(request))
            else:
                queue.push(chain, 0)  # a response buffer with no request, or an empty chain
        queue.notify()

    def on_queue_stop(self, queue_index: int) -> None:
        """Chains popped earlier are void: release them and ignore answers still in flight."""
        with self._lock:
            self._generation += 1
            held = list(self._inflight)
            self._inflight.clear()
        for _, request, response in held:
            if request is not None:
                request.release()
            response.release()
        if self._request_chain is not None:
            self._request_chain.release()
            self._request_chain = None

    def on_stop(self) -> None:
        """Stop the worker (pending requests are dropped)."""
        self.on_queue_stop(0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- internals ---------------------------------------------------------------------------

    def _submit(self, request: DescriptorChain | None, response: DescriptorChain,
                data: bytes | int) -> None:
        entry = (self._generation, request, response)
        with self._lock:
            self._inflight.append(entry)
        if self._executor is None:  # not started through a back end (direct use in tests)
            self._complete(entry, self._answer(data, response.writable_len))
            return
        capacity = response.writable_len

        def work() -> None:
            # Always complete the chain taken, whatever happens: a request left without its
            # answer would make the next answer land in the wrong buffer.
            answer = self._answer(data, capacity)
            backend = self.backend
            if backend is not None and backend.running:
                backend.call_soon(lambda: self._complete(entry, answer))

        self._executor.submit(work)

    def _answer(self, data: bytes | int, capacity: int) -> bytes:
        """The response bytes for request ``data`` (or, as an int, the length of a request too
        large to copy): the NSM's answer, BufferTooSmall when it does not fit ``capacity``,
        InternalError (recorded in ``worker_errors``) when the NSM model itself raised
        (docs/nsm.md#errors)."""
        try:
            if isinstance(data, int):
                answer = self.nsm.input_too_large(data)
            else:
                answer = self.nsm.handle(data)
        except Exception as e:  # a harness bug: the guest gets an error, the test a record
            self.worker_errors.append(f"NSM request handling raised {type(e).__name__}: {e}")
            answer = encode_response(ErrorResponse(NsmErrorCode.InternalError))
        if len(answer) > capacity:
            answer = encode_response(ErrorResponse(NsmErrorCode.BufferTooSmall))
        return answer

    def _complete(self, entry: tuple, answer: bytes) -> None:
        with self._lock:
            # This request's own chains, never the next one's (matched by identity).
            for k, held in enumerate(self._inflight):
                if held is entry:
                    del self._inflight[k]
                    break
            else:
                return  # the ring was stopped meanwhile: the chains are void
        if self.backend is None:
            return
        _, request, response = entry
        queue = self.backend.queues[0]
        if request is not None:
            queue.push(request, 0)
        written = response.write(answer)
        queue.push(response, written)
        self.requests += 1
        queue.notify()


def _request_bytes(chain: DescriptorChain) -> bytes | int:
    """The request's bytes, or its length alone when it is longer than 0x1000 bytes: the
    limit is checked before anything is copied (docs/nsm.md#limits)."""
    if chain.readable_len > MAX_REQUEST_SIZE:
        return chain.readable_len
    return chain.read(MAX_REQUEST_SIZE)
