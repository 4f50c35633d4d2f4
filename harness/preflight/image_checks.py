"""Preflight checks of what init finds in the ramdisks: itself, ``/cmd`` and ``/env``, and the
application's command as init will execute it (docs/boot.md#init, docs/boot.md#cmd-and-env).

Init (AWS's and the harness's alike) reads ``/cmd`` and ``/env`` (both required), ``chroot``s into
``/rootfs`` with ``/`` as the working directory, and executes ``argv[0]`` as is when it contains a
slash, else the first match in ``/sbin:/usr/sbin:/bin:/usr/bin``: AWS's init sets that PATH for
``execvpe`` itself, so the image's own ``PATH`` (in ``/env``) is not searched, and the image's
``WorkingDir`` is ignored, which is why ``CMD ["./app"]`` fails on Nitro (aws-nitro-enclaves-cli#388).
"""

from __future__ import annotations

import posixpath

from harness.preflight.elf import elf_facts, shebang
from harness.preflight.findings import Finding, error, info, warning
from harness.preflight.initramfs import Initramfs, Node

__all__ = ["init_findings", "command_findings", "SEARCH_PATH"]

#: The directories init searches for a command without a slash (docs/boot.md#init).
SEARCH_PATH = ("/sbin", "/usr/sbin", "/bin", "/usr/bin")
_ROOT = "rootfs"


def init_findings(ramfs: Initramfs, arch: str) -> list[Finding]:
    """``/init``: present, a regular executable file, an ELF for ``arch``, statically linked."""
    out = [warning("ramdisk-format", p, "rebuild the EIF with nitro-cli or nitro-harness "
                   "build-enclave") for p in ramfs.problems]
    found = ramfs.lookup("/init")
    node = found.node
    if node is None:
        return out + [error("init-present", "the ramdisks have no /init: the kernel cannot start "
                            "userspace and panics", "build the EIF with an init in its bootstrap "
                            "ramdisk (nitro-cli's blobs, or nitro-harness build-enclave)")]
    if not node.is_file or not node.executable:
        return out + [error("init-executable", f"/init ({found.path}) is not an executable "
                            f"file (mode {node.mode:o})", "ship init with mode 0755")]
    facts = elf_facts(ramfs.read_at(node))
    if facts is None:
        return out + [error("init-format", "/init is not an ELF program", "use the static init "
                            "of nitro-cli's blobs (or the harness's)")]
    if facts.machine != arch:
        out.append(error("init-arch", f"/init is a {facts.machine} program, the kernel is "
                         f"{arch}", f"build init for {arch}"))
    if facts.interp is not None:
        if ramfs.lookup(facts.interp).node is None:
            out.append(error("init-static", f"/init is dynamically linked (interpreter "
                             f"{facts.interp}), which the bootstrap ramdisk does not have: the "
                             "kernel cannot start it and panics", "link init statically "
                             "(gcc -static), as nitro-cli's init is"))
        else:
            out.append(warning("init-static", f"/init is dynamically linked ({facts.interp}); "
                               "it starts only with every library it needs in the ramdisk",
                               "link init statically (gcc -static)"))
    return out


def _lines(ramfs: Initramfs, node: Node) -> list[str]:
    text = ramfs.read(node).decode("utf-8", "replace")
    return text[:-1].split("\n") if text.endswith("\n") else (text.split("\n") if text else [])


def _path_of(env: list[str]) -> list[str]:
    for line in env:
        if line.startswith("PATH="):
            return [d for d in line[5:].split(":") if d]
    return []


def _working_dir(metadata: dict | None) -> str:
    config = ((metadata or {}).get("DockerInfo") or {}).get("Config") or {}
    wd = config.get("WorkingDir") if isinstance(config, dict) else None
    return wd if isinstance(wd, str) and wd.startswith("/") else ""


def _search(ramfs: Initramfs, name: str, dirs) -> tuple[str, Node] | None:
    for d in dirs:
        found = ramfs.lookup(posixpath.join(d, name), _ROOT)
        if found.node is not None and found.node.is_file and found.node.executable:
            return posixpath.join(d, name), found.node
    return None


def command_findings(ramfs: Initramfs, arch: str, metadata: dict | None) -> list[Finding]:
    """``/cmd`` and ``/env`` present; ``argv[0]`` resolvable in ``/rootfs`` as init resolves it,
    an executable file for ``arch`` whose ELF interpreter or ``#!`` interpreter exists."""
    out = []
    cmd, env = ramfs.get("cmd"), ramfs.get("env")
    for name, node in (("cmd", cmd), ("env", env)):
        if node is None or not node.is_file:
            out.append(error(f"{name}-present", f"the customer ramdisk has no /{name}: init "
                             "cannot start the application (AWS's init crashes reading it)",
                             f"build the EIF with nitro-cli or nitro-harness build-enclave, which "
                             f"write /{name}"))
    if cmd is None or not cmd.is_file or ramfs.get(_ROOT) is None:
        if ramfs.get(_ROOT) is None:
            out.append(error("rootfs-present", "the customer ramdisk has no /rootfs: init cannot "
                             "chroot into the image", "build the EIF with nitro-cli or "
                             "nitro-harness build-enclave"))
        return out
    argv = _lines(ramfs, cmd)
    env_lines = _lines(ramfs, env) if env is not None and env.is_file else []
    if not argv:
        out.append(info("cmd-empty", "/cmd is empty: init runs sh", "set the image's CMD or "
                        "ENTRYPOINT"))
        argv = ["sh"]
    return out + _argv0_findings(ramfs, argv[0], arch, env_lines, metadata)


def _argv0_findings(ramfs: Initramfs, argv0: str, arch: str, env: list[str],
                    metadata: dict | None) -> list[Finding]:
    if not argv0:
        return [error("cmd-missing", "/cmd's first line (the program) is empty",
                      "set the image's CMD to an absolute path")]
    if "/" not in argv0:
        hit = _search(ramfs, argv0, SEARCH_PATH)
        if hit is None:
            elsewhere = _search(ramfs, argv0, [d for d in _path_of(env) if d not in SEARCH_PATH])
            where = (f"; it is at {elsewhere[0]}, on the image's PATH, which init does not "
                     "search") if elsewhere else ""
            return [error("cmd-not-found", f"/cmd runs {argv0!r}, which is not in "
                          f"{':'.join(SEARCH_PATH)} of the image{where}",
                          f"use the absolute path ({elsewhere[0]})" if elsewhere else
                          "add the program to the image or name it by an absolute path")]
        return _program_findings(ramfs, hit[0], hit[1], arch, env)
    if not argv0.startswith("/"):
        wd = _working_dir(metadata)
        suggestion = posixpath.normpath(posixpath.join(wd or "/", argv0))
        found = ramfs.lookup(argv0, _ROOT)
        works = found.node is not None and found.node.is_file and found.node.executable
        text = (f"/cmd runs {argv0!r}, a relative path: init starts the application in / and "
                f"ignores the image's WorkingDir{f' ({wd})' if wd else ''}")
        fix = f"use an absolute path: CMD [\"{suggestion}\", ...]"
        if works:
            return [warning("cmd-relative", text + f"; it happens to resolve to {found.path}", fix)]
        return [error("cmd-relative", text + ", so init cannot execute it",
                      fix)]
    found = ramfs.lookup(argv0, _ROOT)
    if found.node is None:
        return [error("cmd-missing", f"/cmd runs {argv0}, but {found.problem} in the image",
                      "fix the image's CMD or add the program")]
    return _program_findings(ramfs, argv0, found.node, arch, env)


def _program_findings(ramfs: Initramfs, path: str, node: Node, arch: str,
                      env: list[str], depth: int = 0) -> list[Finding]:
    """The program at ``path``: a regular executable file; an ELF for ``arch`` with its
    interpreter, or a script whose interpreter exists (followed once)."""
    if not node.is_file:
        return [error("cmd-missing", f"{path} is not a regular file", "point CMD at the program")]
    if not node.executable:
        return [error("cmd-executable", f"{path} has no execute permission (mode "
                      f"{node.mode & 0o7777:o})", f"chmod +x {path} in the image")]
    read_at = ramfs.read_at(node)
    facts = elf_facts(read_at)
    if facts is not None:
        out = []
        if facts.machine != arch:
            out.append(error("cmd-arch", f"{path} is a {facts.machine} program, the enclave "
                             f"runs {arch}", f"build the image for {arch} (linux/amd64)"))
        if facts.interp is not None and ramfs.lookup(facts.interp, _ROOT).node is None:
            out.append(error("cmd-interpreter", f"{path} is dynamically linked, but its "
                             f"interpreter {facts.interp} is not in the image",
                             "add the C library it was linked with (keep the base image's /lib), "
                             "or link it statically"))
        return out
    words = shebang(read_at)
    if words is None:
        return [error("cmd-format", f"{path} is neither an ELF program nor a #! script: "
                      "execve fails (ENOEXEC)", "point CMD at a program or add a #! line")]
    if not words or depth:
        return [error("cmd-interpreter", f"{path}: empty or nested #! line", "name an "
                      "interpreter by absolute path")] if not words else []
    found = ramfs.lookup(words[0], _ROOT)
    if found.node is None:
        return [error("cmd-interpreter", f"{path} starts with #!{words[0]}, which is not in the "
                      "image", f"add {words[0]} to the image or change the #! line")]
    out = _program_findings(ramfs, words[0], found.node, arch, env, depth + 1)
    if posixpath.basename(words[0]) == "env" and len(words) > 1:
        dirs = _path_of(env) or list(SEARCH_PATH)
        if "/" not in words[1] and _search(ramfs, words[1], dirs) is None:
            out.append(warning("cmd-interpreter", f"{path} starts with #!{words[0]} "
                               f"{words[1]}, but {words[1]} is not on the image's PATH "
                               f"({':'.join(dirs)})", f"install {words[1]} or fix PATH"))
    return out
