"""A private apt state for another architecture's Debian packages (docs/boot.md#arm64-images).

An image for an architecture other than the host's (arm64 images on an x86_64 host) is built
from that architecture's packages, and the host's dpkg must not change for it: no
``dpkg --add-architecture``, no foreign lists in ``/var/lib/apt/lists``. apt-get and apt-cache
run instead with options that give them a state of their own under the cache,
``<cache>/apt-<debian arch>/``::

    etc/sources.list   the host's Debian archives (see below), signed by Debian's keyring
    lists/             the package lists apt-get update fetched for that architecture
    status             empty: nothing is installed in this state
    archives/          apt's download folder (downloads go to the caller's folder instead)

The sources are the host's own Debian archives, as apt itself reads them
(``apt-get indextargets``, the targets whose Release file says ``Origin: Debian``: main,
updates and security of the host's release, not backports, whose packages are never apt's
candidates anyway), so an arm64 image resolves the same versions an x86_64 image does from
the same mirror. When the host's lists name none (no ``apt-get update`` yet),
:data:`FALLBACK_SOURCES` is used: Debian's own mirror network at deb.debian.org, bookworm.

The lists are fetched by ``nitro-harness setup --only sources`` and, when missing, once on
demand by the first build that needs them (:func:`ensure_lists`, under a file lock). Standard
library only: the set-up's sources step refreshes them before the dependencies are installed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

from harness.atomic_file import write_atomically
from harness.errors import ErrorCode, NitroError
from harness.images.file_lock import exclusive_lock

__all__ = ["DEBIAN_KEYRING", "FALLBACK_SOURCES", "apt_options", "ensure_lists",
           "has_lists", "host_debian_sources", "refresh", "sources_list", "state_dir"]

#: Debian's archive keyring (package debian-archive-keyring), which signs every archive a
#: private state lists.
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

#: (URI, suite, component) used when the host's apt names no Debian archive: deb.debian.org is
#: Debian's mirror network, bookworm the release the harness supports (docs/architecture.md#host).
FALLBACK_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("http://deb.debian.org/debian", "bookworm", "main"),
    ("http://deb.debian.org/debian", "bookworm-updates", "main"),
    ("http://deb.debian.org/debian-security", "bookworm-security", "main"),
)


def state_dir(cache: Path, debian_arch: str) -> Path:
    """The private apt state of Debian architecture ``debian_arch`` (``arm64``) under the cache
    root ``cache``: ``<cache>/apt-<debian_arch>``."""
    return cache / f"apt-{debian_arch}"


def apt_options(state: Path, debian_arch: str) -> list[str]:
    """The ``-o`` options (a flat argv list) that make apt-get or apt-cache use the private
    state ``state`` for ``debian_arch`` only: its architecture, lists, status file, sources and
    caches. Nothing outside ``state`` is read or written but apt's configuration and keyrings."""
    opts = [
        f"APT::Architecture={debian_arch}",
        f"APT::Architectures={debian_arch}",
        f"Dir::State::Lists={state}/lists",
        f"Dir::State::status={state}/status",
        f"Dir::Etc::SourceList={state}/etc/sources.list",
        # A folder that does not exist: the host's sources.list.d stays out.
        f"Dir::Etc::SourceParts={state}/etc/none",
        f"Dir::Cache={state}",
        f"Dir::Cache::archives={state}/archives",
    ]
    return [word for opt in opts for word in ("-o", opt)]


def _sandbox_options() -> list[str]:
    # apt drops to the _apt user to download, who cannot write into root's home: stay root.
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def host_debian_sources() -> list[tuple[str, str, str]]:
    """(URI, suite, component) of every Debian archive the host's apt uses for binary
    packages (``apt-get indextargets``, ``Origin: Debian``), in apt's order, each once; empty
    when apt is missing or its lists have not been fetched (the origin comes from them)."""
    try:
        proc = subprocess.run(
            ["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(COMPONENT)",
             "Created-By: Packages", "Origin: Debian"],
            capture_output=True, text=True, check=False)
    except OSError:
        return []
    if proc.returncode != 0:
        return []
    out: list[tuple[str, str, str]] = []
    for line in proc.stdout.splitlines():
        words = line.split()
        if len(words) == 3 and tuple(words) not in out:
            out.append((words[0], words[1], words[2]))
    return out


def sources_list(sources: list[tuple[str, str, str]] | tuple[tuple[str, str, str], ...]) -> str:
    """A one-line-style sources.list for ``sources`` ((URI, suite, component) triples): one
    ``deb`` line per archive and suite with its components, signed by :data:`DEBIAN_KEYRING`
    when that file exists (else apt's trusted keys decide)."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for uri, suite, component in sources:
        comps = grouped.setdefault((uri, suite), [])
        if component not in comps:
            comps.append(component)
    signed = f" [signed-by={DEBIAN_KEYRING}]" if DEBIAN_KEYRING.is_file() else ""
    return "".join(f"deb{signed} {uri} {suite} {' '.join(comps)}\n"
                   for (uri, suite), comps in grouped.items())


def has_lists(state: Path) -> bool:
    """Whether ``state`` holds fetched package lists (an ``apt-get update`` has run)."""
    lists = state / "lists"
    return lists.is_dir() and any(lists.glob("*_Packages*"))


def _refresh_locked(state: Path, debian_arch: str) -> str:
    sources = host_debian_sources() or list(FALLBACK_SOURCES)
    text = sources_list(sources)
    try:
        for sub in ("lists/partial", "archives/partial", "etc"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        status = state / "status"
        if not status.is_file():
            write_atomically(status, b"")
        write_atomically(state / "etc" / "sources.list", text.encode())
    except OSError as err:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{state}: cannot write the private apt state "
                         f"({err.strerror or err})") from None
    argv = ["apt-get", "-q", *apt_options(state, debian_arch), *_sandbox_options(), "update"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as err:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{state}: apt-get not found ({err.strerror or err}): a Debian host "
                         "with apt is required") from None
    # apt-get update can exit 0 when an index could not be fetched (it keeps the old one, or
    # none): only lists on disk count.
    if proc.returncode != 0 or not has_lists(state):
        tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{state}: apt-get update for {debian_arch} failed "
                         f"(exit {proc.returncode}): {tail or 'no package lists fetched'}")
    return text


def _lock(cache: Path, debian_arch: str):
    cache.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(cache / f".apt-{debian_arch}.lock")


def refresh(cache: Path, debian_arch: str) -> str:
    """(Re)write the private state of ``debian_arch`` under the cache root ``cache`` (folders,
    empty status, sources.list from :func:`host_debian_sources` or :data:`FALLBACK_SOURCES`)
    and run ``apt-get update`` in it; return the sources.list written. Holds the state's file
    lock throughout. Raises NitroError(E48) naming the state when apt-get is missing or fetches
    no lists."""
    with _lock(cache, debian_arch):
        return _refresh_locked(state_dir(cache, debian_arch), debian_arch)


def ensure_lists(cache: Path, debian_arch: str,
                 log: Callable[[str], None] = lambda _msg: None) -> Path:
    """The private state of ``debian_arch``, its lists fetched first (once, under the state's
    file lock, so parallel builds fetch them once) when it has none; ``log`` gets one line
    when they are fetched. Raises as :func:`refresh`."""
    state = state_dir(cache, debian_arch)
    if not has_lists(state):
        with _lock(cache, debian_arch):
            if not has_lists(state):
                log(f"fetching the {debian_arch} package lists into {state} (apt-get update)")
                _refresh_locked(state, debian_arch)
    return state
