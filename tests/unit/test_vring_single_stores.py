"""The device's writes to the used ring are single stores, as a driver on another CPU needs them
(docs/vhost-user.md#used-ring-invariant).

A guest vCPU reads used->idx while the back end writes it. When the back end wrote ring fields
with ``struct.pack_into``, CPython cleared the field first and then stored it a byte at a time,
so a driver reading at the wrong moment saw used->idx jump back (to 0, or to a value with only
its low byte new). Linux's virtqueue_get_buf then took that index as "more used entries" and
read a slot the device had not written yet in this lap: the previous lap's id, which it
rejected with "id N is not a head" and broke the queue. Here a watcher process plays the
driver's CPU: it maps the same guest RAM and reads used->idx in a tight loop while the device
pushes; every value it sees must be one the device published, never an index going back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from harness.vhost_user import VhostUserBackend
from helpers.vhost_user_frontend import FakeFrontend
from test_vhost_user import EchoDevice

# The watcher: reads the u16 at OFFSET of the memfd with single 2-byte loads (a memoryview of
# format "H") until stdin closes; prints how many reads it made and how many went backwards.
WATCHER = textwrap.dedent("""
    import mmap, os, sys, threading
    fd, offset, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    mm = mmap.mmap(fd, size)
    word = memoryview(mm)[offset:offset + 2].cast("H")
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print("ready", flush=True)
    reads = backwards = 0
    last = word[0]
    examples = []
    while not done.is_set():
        for _ in range(10000):
            v = word[0]
            if (v - last) & 0xFFFF > 0x8000:
                backwards += 1
                if len(examples) < 5:
                    examples.append((last, v))
            last = v
        reads += 10000
    print(reads, backwards, examples, flush=True)
    del word
""")

ROUNDS = 400
BATCH = 64  # chains per round; 400 x 64 = 25,600 pushes: used->idx wraps its u16 0.4 times


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="the watcher must run on another CPU while the device pushes")
def test_used_idx_never_goes_back_for_a_driver_reading_concurrently(tmp_path):
    path = str(tmp_path / "vu.sock")
    be = VhostUserBackend(path, EchoDevice(), offer_config=True)
    be.start()
    fe = FakeFrontend(path)
    watcher = None
    try:
        fe.handshake()
        q = fe.start_queues([256, 256])[0]
        watcher = subprocess.Popen(
            [sys.executable, "-c", WATCHER, str(fe.memfd), str(fe._off(q.used + 2)),
             str(fe.mem_size + fe.mmap_offset)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=[fe.memfd])
        assert watcher.stdout.readline().strip() == "ready"
        for _ in range(ROUNDS):
            for _ in range(BATCH):
                q.add([b"x"], [8])
            q.kick()
            assert q.wait_used(BATCH, timeout=10), "the device stopped returning chains"
            assert len(q.collect()) == BATCH
        out, _ = watcher.communicate(timeout=30)
        reads, backwards, examples = out.split(maxsplit=2)
        error = be.error  # before the front end hangs up (which the back end reports)
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        fe.close()
        be.stop()
    assert error is None
    # The watcher really ran alongside the device (millions of reads), and never saw an index
    # the device did not publish.
    assert int(reads) > 100_000
    assert int(backwards) == 0, f"used->idx went back {backwards} times, e.g. {examples}"


