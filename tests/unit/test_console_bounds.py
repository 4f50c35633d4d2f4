"""The console stays bounded whatever the guest prints: memory holds a window, the log file holds
every byte, expectations read new text plus a bounded overlap (docs/boot.md#console).

No QEMU: the test plays QEMU's part on the console socket (a connected Unix socket), so it
chooses exactly which bytes arrive and how they are split.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness.console import READ_SIZE, WINDOW, Console, ConsoleFailure, ConsoleTimeout
from harness.console_window import _PIECE

# Most the window may hold beyond its size: a piece of merged reads or one read.
SLACK = max(_PIECE, READ_SIZE)


@pytest.fixture
def wire(tmp_path):
    """``wire(**sizes)`` -> ``(console, peer)``: a listening Console and the socket standing for
    QEMU's end of it."""
    made = []

    def make(**sizes):
        console = Console(tmp_path / "c.sock", tmp_path / "console.log", **sizes)
        console.listen()
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(str(tmp_path / "c.sock"))
        console.attach(timeout=5)
        made.append((console, peer))
        return console, peer

    yield make
    for console, peer in made:
        console.close()
        peer.close()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def _wait_position(console, position, timeout=30.0):
    deadline = time.monotonic() + timeout
    while console.position < position:
        assert time.monotonic() < deadline, f"console at {console.position}, waiting for {position}"
        time.sleep(0.01)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_a_50_mb_flood_keeps_memory_bounded_and_every_byte_in_the_log(wire, tmp_path):
    console, peer = wire()
    line = b"flood: " + b"0123456789abcdef" * 4 + b"\n"
    block = line * ((1 << 20) // len(line))
    rounds = 50 * (1 << 20) // len(block) + 1
    expected = hashlib.sha256()
    for _ in range(rounds):
        expected.update(block)
    expected.update(b"END-OF-FLOOD\n")

    def flood():
        for _ in range(rounds):
            peer.sendall(block)
        peer.sendall(b"END-OF-FLOOD\n")

    tracemalloc.start()
    try:
        sender = threading.Thread(target=flood)
        sender.start()
        # Waits through the whole flood from the console's start: the text it falls behind on
        # is read back from the log file, and nothing it reads is kept.
        match = console.expect(r"END-OF-FLOOD", timeout=300, start=0)
        sender.join()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    flooded = rounds * len(block)
    assert flooded > 50_000_000
    assert match.span() == (flooded, flooded + len("END-OF-FLOOD"))
    assert console.position == flooded + len("END-OF-FLOOD\n")
    text = console.text()
    assert WINDOW <= len(text) <= WINDOW + SLACK
    assert console.window_start == console.position - len(text)
    assert text.endswith(line.decode() + "END-OF-FLOOD\n")
    # Everything the console and the expectation allocated at once, the flood's 1 MiB block
    # (allocated before) aside: a small multiple of the window, not of the 50 MB.
    assert peak < 8 << 20, f"peak {peak} bytes"
    assert (tmp_path / "console.log").stat().st_size == flooded + len("END-OF-FLOOD\n")
    assert _sha256(tmp_path / "console.log") == expected.hexdigest()


def test_matches_across_reads_and_split_utf8(wire, tmp_path, pool):
    console, peer = wire()
    pieces = [b"boot: caf", b"\xc3", b"\xa9 ", b"Hel", b"lo wo", b"rld\r\n", b"bad \xff byte\r\n"]
    waiting = pool.submit(console.expect, r"Hello world$", timeout=10)
    for piece in pieces:
        peer.sendall(piece)
        time.sleep(0.05)  # each piece its own read
    match = waiting.result()
    assert match.span() == (len("boot: café "), len("boot: café Hello world"))
    assert console.expect(r"^bad \ufffd byte$", timeout=5, start=match.end()).start() == len(
        "boot: café Hello world\n")
    assert console.text() == "boot: café Hello world\nbad \ufffd byte\n"
    assert (tmp_path / "console.log").read_bytes() == b"".join(pieces)


def test_a_match_straddling_the_overlap_is_found(wire, pool):
    console, peer = wire(window=256, overlap=16, chunk=16)
    waiting = pool.submit(console.expect, r"ABCDEFGHIJKLMNOP", timeout=10)  # 16 = the overlap
    peer.sendall(b"x" * 1000 + b"ABCDEFGH")
    _wait_position(console, 1008)
    time.sleep(0.3)  # the expectation has read up to here and waits
    peer.sendall(b"IJKLMNOP" + b"y" * 1000)
    assert waiting.result().span() == (1000, 1016)


def test_a_match_longer_than_a_search_window_is_not_searched_for(wire):
    # The bound that keeps expectations linear: each search covers the new text plus the
    # overlap (16 + 16 characters here), never the whole console.
    console, peer = wire(window=4096, overlap=16, chunk=16)
    long_line = "0123456789abcdefghijklmnopqrstuvwxyzABCD"
    peer.sendall(b"x" * 100 + long_line.encode() + b"\n")
    _wait_position(console, 141)
    assert long_line in console.text()
    with pytest.raises(ConsoleTimeout):
        console.expect(long_line, timeout=0.5)
    assert console.expect(long_line[:16], timeout=5).start() == 100


def test_text_before_the_window_is_read_back_from_the_log(wire, tmp_path):
    console, peer = wire(window=64, overlap=16, chunk=16)
    for piece in (b"MARK-1\n", b"z" * 5000, b"\nMARK-2\n"):  # three reads
        peer.sendall(piece)
        time.sleep(0.05)
    _wait_position(console, 5015)
    assert console.window_start > 0 and "MARK-1" not in console.text()
    first = console.expect(r"MARK-(\d)", timeout=5, start=0)
    assert (first.span(), first.group(1)) == ((0, 6), "1")
    second = console.expect(r"MARK-(\d)", timeout=5, start=first.end())
    assert (second.start(), second.group(1)) == (5008, "2")
    assert console.watch("MARK-1", start=0).poll().start() == 0
    # Without the log, the dropped text cannot be read: the failure says so.
    (tmp_path / "console.log").unlink()
    with pytest.raises(ConsoleTimeout) as err:
        console.expect(r"MARK-1", timeout=0.5, start=0)
    assert "characters scrolled out of the console window before they were read" in str(err.value)


def test_the_failure_pattern_counts_only_before_the_match(wire):
    console, peer = wire()
    first = b"target\nKernel panic - after the target\n"
    peer.sendall(first)
    assert console.expect("target", timeout=5).group(0) == "target"
    _wait_position(console, len(first))
    start = console.position
    second = b"Kernel panic - not syncing: test\ntarget\n"
    peer.sendall(second)
    with pytest.raises(ConsoleFailure) as err:
        console.expect("target", timeout=5, start=start)
    assert "console printed 'Kernel panic' while waiting for 'target'" in str(err.value)
    assert "not syncing: test" in err.value.excerpt
    found = console.expect("target", timeout=5, start=start, fail_pattern=None)
    assert found.start() == start + second.index(b"target")
    start += len(second)
    third = b"tick\ntick\nnitro-init: fatal: no app\ntick\n"
    peer.sendall(third)
    with pytest.raises(ConsoleFailure) as err:
        console.expect("tick", timeout=5, start=start, count=3)
    assert "'nitro-init: fatal'" in str(err.value)
    found = console.expect("tick", timeout=5, start=start, count=3, fail_pattern=None)
    assert found.start() == start + third.rindex(b"tick")


def test_count_and_absolute_positions(wire):
    console, peer = wire()
    peer.sendall(b"".join(b"tick %d\n" % i for i in range(1, 6)))
    third = console.expect(r"tick (\d)", timeout=5, count=3)
    assert (third.group(1), third.span()) == ("3", (14, 20))
    fifth = console.expect(r"tick (\d)", timeout=5, count=2, start=third.end())
    assert (fifth.group(1), fifth.start(1)) == ("5", 33)
    with pytest.raises(ConsoleTimeout) as err:
        console.expect(r"tick", timeout=0.3, count=6)
    assert "6 times (seen 5)" in str(err.value)


def test_a_watch_reads_each_text_once(wire):
    console, peer = wire()
    watch = console.watch("panic")
    assert watch.poll() is None
    peer.sendall(b"a panic\n")
    _wait_position(console, 8)
    assert watch.poll().start() == 2
    assert watch.poll() is None
    peer.sendall(b"another panic\n")
    _wait_position(console, 22)
    assert watch.poll().start() == 16
    watch.close()


def test_closing_ends_a_waiting_expectation_and_releases_everything(tmp_path, pool):
    fds = len(os.listdir("/proc/self/fd"))
    console = Console(tmp_path / "c.sock", tmp_path / "console.log")
    console.listen()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(str(tmp_path / "c.sock"))
    console.attach(timeout=5)
    stop = threading.Event()

    def flood():
        with contextlib.suppress(OSError):  # the console closed its end
            while not stop.is_set():
                peer.sendall(b"y\n" * 4096)

    sender = threading.Thread(target=flood)
    sender.start()
    waiting = pool.submit(console.expect, "never printed", timeout=60)
    time.sleep(0.3)
    console.close()
    with pytest.raises(ConsoleFailure) as err:
        waiting.result(timeout=30)
    assert "the console closed" in str(err.value)
    assert console.ended and not console._thread.is_alive()
    stop.set()
    sender.join()
    peer.close()
    console.close()  # idempotent
    assert not (tmp_path / "c.sock").exists()
    assert len(os.listdir("/proc/self/fd")) == fds
    with pytest.raises(ConsoleFailure):
        console.write(b"too late\n")


def test_the_peer_closing_ends_the_console_and_its_log_stream(wire):
    console, peer = wire()
    sent = b"first\r\n\xffsecond\r\n"
    peer.sendall(sent)
    peer.close()
    with pytest.raises(ConsoleFailure) as err:
        console.expect("never printed", timeout=30)
    assert "the console closed (the enclave ended) before 'never printed' appeared" in str(err.value)
    assert console.ended
    assert b"".join(console.follow_log()) == sent
