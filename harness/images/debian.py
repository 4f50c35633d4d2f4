"""Debian packages for enclave images: resolve with apt-cache, fetch with apt-get, unpack with dpkg.

Nothing is installed on the host: ``apt-get download`` fetches ``.deb`` files into the package
cache (``~/.cache/nitro-harness/debs/``, or ``$NITRO_HARNESS_CACHE/debs``) and ``dpkg -x``
unpacks them into an image's root directory (docs/architecture.md#environment). Every fetched file is
checked against the SHA256 in the apt index, and that hash is part of an image's cache key.

Packages are those of the image's architecture (:class:`harness.arch.Arch`, default x86_64).
For the host's own architecture apt runs as it is, on the host's lists; for another one (arm64
on an x86_64 host) it runs on a private apt state under the cache (:mod:`harness.images.apt_state`,
docs/boot.md#arm64-images), so the host's dpkg never learns of a foreign architecture.

Dependency resolution walks ``Depends`` and ``Pre-Depends`` of apt's candidate versions; a
recipe lists the packages the guest does not need (``dpkg``, ``perl-base``, ...) so that they
and everything only they pull in are left out. Version constraints are not re-checked: apt's
candidates of one release satisfy each other.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from harness.arch import X86_64, Arch, host_arch
from harness.errors import ErrorCode, NitroError
from harness.images import apt_state

#: Recipe-independent hint printed with every apt failure of the host's apt.
_APT_HINT = "run `apt-get update` (`nitro-harness setup --only sources` adds bookworm-backports) and retry"


def cache_root() -> Path:
    """The harness's cache directory: ``$NITRO_HARNESS_CACHE`` or ``~/.cache/nitro-harness``."""
    env = os.environ.get("NITRO_HARNESS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nitro-harness"


def deb_cache() -> Path:
    """Directory of fetched ``.deb`` files (created on demand)."""
    d = cache_root() / "debs"
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- which apt: the host's, or a private state for another architecture ------------------


def uses_host_apt(arch: Arch) -> bool:
    """Whether ``arch``'s packages come from the host's apt as it is (the host's own
    architecture) rather than a private state (:mod:`harness.images.apt_state`)."""
    return arch == host_arch()


def apt_state_dir(arch: Arch) -> Path:
    """The private apt state of ``arch``: ``<cache>/apt-<debian arch>`` (``apt-arm64``)."""
    return apt_state.state_dir(cache_root(), arch.debian)


def apt_argv(tool: str, arch: Arch = X86_64) -> list[str]:
    """The command that starts ``tool`` (``apt-get`` or ``apt-cache``) for ``arch``'s packages:
    ``[tool]`` for the host's architecture, else ``tool`` with the private state's options
    (:func:`harness.images.apt_state.apt_options`). Builds the list only: nothing is run or
    fetched."""
    if uses_host_apt(arch):
        return [tool]
    return [tool, *apt_state.apt_options(apt_state_dir(arch), arch.debian)]


def ensure_lists(arch: Arch = X86_64, log: Callable[[str], None] = lambda _msg: None) -> None:
    """Fetch the package lists of ``arch``'s private apt state when it has none (once, under
    the state's file lock; :func:`harness.images.apt_state.ensure_lists`, which tells ``log``);
    nothing for the host's architecture, whose lists are the host's business. Raises
    NitroError(E48) when apt-get update fails."""
    if not uses_host_apt(arch):
        apt_state.ensure_lists(cache_root(), arch.debian, log)


def _apt(tool: str, arch: Arch) -> list[str]:
    """:func:`apt_argv`, after :func:`ensure_lists`."""
    ensure_lists(arch)
    return apt_argv(tool, arch)


def _apt_hint(arch: Arch) -> str:
    """What to do after an apt failure for ``arch``'s packages."""
    if uses_host_apt(arch):
        return _APT_HINT
    return (f"run `nitro-harness setup --only sources` (refreshes the {arch.debian} package "
            f"lists in {apt_state_dir(arch)}) and retry")


def _shown(argv: list[str]) -> str:
    """``argv``'s first three words without ``-o`` options: what an error message names."""
    words: list[str] = []
    it = iter(argv)
    for word in it:
        if word == "-o":
            next(it, None)
            continue
        words.append(word)
    return " ".join(words[:3])


@dataclass(frozen=True)
class DebPackage:
    """One binary package as apt's index describes its candidate version.

    ``sha256`` is the hex SHA-256 of the ``.deb`` from the index; ``size`` its length in bytes;
    ``depends`` / ``pre_depends`` are the raw control-field strings ('' when absent).
    """

    name: str
    version: str
    architecture: str
    sha256: str
    size: int
    depends: str = ""
    pre_depends: str = ""

    @property
    def filename(self) -> str:
        """Cache file name: ``<name>_<version>_<arch>.deb`` with ``:`` written ``%3a`` (apt's)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"

    def key(self) -> dict[str, str]:
        """The fields that identify this package in an image's input hash."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def _run(argv: list[str], what: str, ok_codes: tuple[int, ...] = (0,), *,
         arch: Arch = X86_64) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{what}: {argv[0]} not found (a Debian host with apt is required)") from err
    if proc.returncode not in ok_codes:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{what}: `{_shown(argv)} ...` exited {proc.returncode}: "
                         f"{' / '.join(tail)}; {_apt_hint(arch)}")
    return proc


def _parse_stanzas(text: str) -> list[dict[str, str]]:
    """Parse deb822 control stanzas (``apt-cache show`` output) into dicts of field -> value."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur, last = {}, None
        elif line[0] in " \t" and last:
            cur[last] += "\n" + line.strip()
        elif ":" in line:
            k, v = line.split(":", 1)
            cur[k] = v.strip()
            last = k
    if cur:
        out.append(cur)
    return out


def show(names: Iterable[str], arch: Arch = X86_64) -> dict[str, DebPackage]:
    """Return apt's candidate stanza of ``arch`` for each real package among ``names``, keyed
    by name.

    Names apt does not know as real packages (virtual or missing) are absent from the result.
    Runs one ``apt-cache show --no-all-versions`` for all names (:func:`apt_argv`; a private
    state's lists are fetched first when missing). Raises NitroError(E48) when apt-cache fails.
    """
    names = sorted(set(names))
    if not names:
        return {}
    # Exit 100 when some name is not a real package; the others are still printed.
    proc = _run([*_apt("apt-cache", arch), "show", "--no-all-versions", *names],
                "apt-cache show", ok_codes=(0, 100), arch=arch)
    found: dict[str, DebPackage] = {}
    for st in _parse_stanzas(proc.stdout):
        name = st.get("Package")
        if not name or name in found or "SHA256" not in st:
            continue
        found[name] = DebPackage(
            name=name, version=st["Version"], architecture=st.get("Architecture", arch.debian),
            sha256=st["SHA256"].lower(), size=int(st.get("Size", "0")),
            depends=st.get("Depends", ""), pre_depends=st.get("Pre-Depends", ""),
        )
    return found


def providers(virtual: str, arch: Arch = X86_64) -> list[str]:
    """Real packages of ``arch`` that ``Provides`` the virtual package ``virtual`` (apt-cache
    showpkg). Raises NitroError(E48) when apt-cache fails."""
    proc = _run([*_apt("apt-cache", arch), "showpkg", virtual], "apt-cache showpkg",
                ok_codes=(0, 100), arch=arch)
    out: list[str] = []
    in_section = False
    for line in proc.stdout.splitlines():
        if line.startswith("Reverse Provides:"):
            in_section = True
            continue
        if in_section:
            if not line.strip() or line.endswith(":"):
                break
            out.append(line.split()[0])
    return out


_ALT_RE = re.compile(r"^\s*([A-Za-z0-9.+-]+)(?::[a-z0-9]+)?\s*(?:\(.*\))?\s*(?:\[.*\])?\s*$")


def parse_relations(field: str) -> list[list[str]]:
    """Split a Depends-style field into groups of alternative package names.

    ``"a (>= 1), b | c, python3:any"`` -> ``[["a"], ["b", "c"], ["python3"]]``; version
    constraints and architecture qualifiers are dropped (apt's candidates satisfy them).
    """
    groups: list[list[str]] = []
    for group in field.split(","):
        if not group.strip():
            continue
        alts = []
        for alt in group.split("|"):
            m = _ALT_RE.match(alt)
            if m:
                alts.append(m.group(1))
        if alts:
            groups.append(alts)
    return groups


def resolve(names: Iterable[str], *, skip: Iterable[str] = (), what: str = "debs",
            arch: Arch = X86_64) -> list[DebPackage]:
    """Return ``names`` plus every package their Depends/Pre-Depends pull in, sorted by name,
    as ``arch``'s packages.

    ``skip`` names are never included nor walked (the recipe's list of host-only packages).
    For ``a | b`` the first alternative already chosen, else the first real package, else the
    first provider of a virtual one is taken; a group whose every alternative is skipped is
    dropped. Raises NitroError(E48) naming ``what`` (the recipe field) for an unknown package.
    """
    skip_set = set(skip)
    chosen: dict[str, DebPackage] = {}
    known: dict[str, DebPackage | None] = {}

    def lookup(batch: set[str]) -> None:
        batch = {n for n in batch if n not in known}
        if not batch:
            return
        got = show(batch, arch)
        for n in batch:
            known[n] = got.get(n)

    todo = [n for n in dict.fromkeys(names) if n not in skip_set]
    lookup(set(todo))
    for n in todo:
        if known.get(n) is None:
            raise NitroError(ErrorCode.EifBuildingError,
                             f"{what}: package {n!r} is not in apt's {arch.debian} index; "
                             f"{_apt_hint(arch)}")
    while todo:
        pending: list[list[str]] = []
        for n in todo:
            if n in chosen:
                continue
            pkg = known[n]
            assert pkg is not None
            chosen[n] = pkg
            pending += parse_relations(pkg.pre_depends) + parse_relations(pkg.depends)
        lookup({a for g in pending for a in g})
        nxt: list[str] = []
        for group in pending:
            alts = [a for a in group if a not in skip_set]
            if not alts or any(a in chosen or a in nxt for a in alts):
                continue
            real = next((a for a in alts if known.get(a) is not None), None)
            if real is None:
                # Virtual package: take a provider already chosen, else the first one.
                provs = [p for a in alts for p in providers(a, arch) if p not in skip_set]
                real = next((p for p in provs if p in chosen or p in nxt), None)
                if real is None and provs:
                    lookup({provs[0]})
                    real = provs[0] if known.get(provs[0]) is not None else None
                if real is None:
                    raise NitroError(ErrorCode.EifBuildingError,
                                     f"{what}: no installable package for dependency "
                                     f"{' | '.join(group)!r}; add it to the recipe's skip list "
                                     f"or {_apt_hint(arch)}")
            if real not in chosen and real not in nxt:
                nxt.append(real)
        todo = nxt
    return sorted(chosen.values(), key=lambda p: p.name)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(packages: Iterable[DebPackage], arch: Arch = X86_64) -> dict[str, Path]:
    """Make sure every package's ``.deb`` is in the cache; return name -> path. ``arch`` is
    the architecture the packages were resolved for (whose apt downloads them); the file
    names carry each package's architecture, so one cache holds them all.

    Missing files are fetched with one ``apt-get download name=version ...`` into a temporary
    directory, checked against the index's SHA256 and renamed into place (a half-fetched file
    is never left under its final name). Raises NitroError(E48) on a failed download or a hash
    mismatch. Cached files are trusted by name and size (their hash was checked when fetched).
    """
    cache = deb_cache()
    paths: dict[str, Path] = {}
    missing: list[DebPackage] = []
    for pkg in packages:
        p = cache / pkg.filename
        paths[pkg.name] = p
        if not (p.is_file() and (pkg.size == 0 or p.stat().st_size == pkg.size)):
            missing.append(pkg)
    if not missing:
        return paths
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        argv = [*_apt("apt-get", arch), "download", "-q"]
        if os.geteuid() == 0:
            # apt drops to the _apt user, who cannot write into root's home: stay root.
            argv += ["-o", "APT::Sandbox::User=root"]
        argv += [f"{p.name}={p.version}" for p in missing]
        proc = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = " / ".join(proc.stderr.strip().splitlines()[-3:])
            raise NitroError(ErrorCode.EifBuildingError,
                             f"apt-get download {len(missing)} package(s) failed "
                             f"(exit {proc.returncode}): {tail}; {_apt_hint(arch)}")
        for pkg in missing:
            got = Path(tmp) / pkg.filename
            if not got.is_file():
                cands = list(Path(tmp).glob(f"{pkg.name}_*.deb"))
                if len(cands) != 1:
                    raise NitroError(ErrorCode.EifBuildingError,
                                     f"apt-get download: no file for {pkg.name}={pkg.version}")
                got = cands[0]
            digest = sha256_file(got)
            if digest != pkg.sha256:
                raise NitroError(ErrorCode.EifBuildingError,
                                 f"{got.name}: SHA256 {digest} does not match apt's index "
                                 f"({pkg.sha256}); {_apt_hint(arch)}")
            os.replace(got, paths[pkg.name])
    return paths


def extract(deb: Path, dest: Path) -> None:
    """Unpack the data of ``deb`` into ``dest`` with ``dpkg -x`` (no maintainer scripts run).

    Raises NitroError(E48) naming the file when dpkg fails.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg") is None:
        raise NitroError(ErrorCode.EifBuildingError, f"{deb}: dpkg not found (Debian host needed)")
    proc = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise NitroError(ErrorCode.EifBuildingError,
                         f"{deb}: dpkg -x failed: {proc.stderr.strip().splitlines()[-1:]}")


def apt_index_fingerprint(arch: Arch = X86_64) -> str:
    """A hex digest of the package lists ``arch``'s packages are resolved from (names, sizes,
    mtimes): the host's ``/var/lib/apt/lists``, or the private state's ``lists/`` for another
    architecture. Changes after apt-get update.

    Used to reuse a dependency resolution until the index changes.
    """
    h = hashlib.sha256()
    lists = Path("/var/lib/apt/lists") if uses_host_apt(arch) else apt_state_dir(arch) / "lists"
    for p in sorted(lists.glob("*_Packages*")) if lists.is_dir() else []:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
