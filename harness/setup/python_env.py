"""The set-up's python step: the harness and its test extras installed where it runs from.

From a source checkout (``scripts/setup.sh`` or an editable install), ``pip install -e
'<checkout>[test]'`` into the interpreter the set-up runs with, skipped while ``pyproject.toml``
is unchanged (a stamp in the cache per interpreter prefix and checkout); a Debian-managed
Python that refuses pip (PEP 668) gets ``<checkout>/.venv`` instead. An installed package has
nothing to install: the step says where it is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from harness import __version__, assets
from harness.setup.context import Context, StepFailed

_MANAGED = ("import sys, sysconfig, pathlib; "
            "m = pathlib.Path(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED').exists(); "
            "sys.exit(0 if m and sys.prefix == sys.base_prefix else 1)")


def _clean_env(ctx: Context, checkout: Path) -> dict[str, str]:
    """The environment without the checkout on PYTHONPATH (scripts/setup.sh puts it there), so
    that "is the harness installed here" asks the interpreter, not the path."""
    keep = [p for p in ctx.env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != checkout]
    env = {k: v for k, v in ctx.env.items() if k != "PYTHONPATH"}
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    return env


def pip_stamp(ctx: Context, prefix: str, checkout: Path) -> Path:
    """The stamp recording ``pyproject.toml``'s hash after an install of ``checkout`` into the
    interpreter at ``prefix`` (``<cache>/pip-<12 hex>.stamp``: sha256 of ``prefix|checkout``)."""
    digest = hashlib.sha256(f"{prefix}|{checkout}".encode()).hexdigest()[:12]
    return ctx.cache / f"pip-{digest}.stamp"


def venv_python(checkout: Path) -> Path:
    """The interpreter of the checkout's ``.venv``."""
    return checkout / ".venv" / "bin" / "python"


def step_python(ctx: Context) -> None:
    """Install the checkout editable with its test extras (see the module's rules); for an
    installed package, say where it is. Raises StepFailed for a missing or too old Python,
    a failed venv creation or a failed pip install."""
    checkout = assets.source_checkout()
    if checkout is None:
        ctx.log(f"cached: nitro-harness {__version__} installed as a package "
                f"({Path(assets.__file__).parent}); nothing to install")
        return
    env = _clean_env(ctx, checkout)
    status, _ = ctx.output([ctx.python, "-c", _MANAGED], env=env)
    if status == 127:
        raise StepFailed(f"PYTHON={ctx.python} not found")
    if status == 0:
        # A Debian-managed Python refuses pip (PEP 668): use a venv in the checkout instead.
        ctx.log(f"{ctx.python} is externally managed (PEP 668): using {checkout / '.venv'}")
        if not venv_python(checkout).exists():
            if ctx.dry_run:
                ctx.log(f"would create {checkout / '.venv'} and pip install -e '.[test]' there")
                return
            ctx.run([ctx.python, "-m", "venv", str(checkout / ".venv")],
                    f"{ctx.python} -m venv {checkout / '.venv'}")
        ctx.python = str(venv_python(checkout))
    status, prefix = ctx.output(
        [ctx.python, "-c", "import sys; print(sys.prefix); sys.exit(sys.version_info < (3, 11))"],
        env=env)
    if status != 0:
        raise StepFailed(f"{ctx.python} is older than 3.11 (or does not run)")
    stamp = pip_stamp(ctx, prefix.strip(), checkout)
    want = hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest()
    # From / so that the current folder (a checkout?) is not what gets imported.
    _, here = ctx.output([ctx.python, "-c", "import harness, pathlib; "
                          "print(pathlib.Path(harness.__file__).resolve().parent.parent)"],
                         env=env, cwd="/")
    try:
        stamped = stamp.read_text().strip()
    except OSError:
        stamped = ""
    if stamped == want and here.strip() == str(checkout):
        ctx.log(f"cached: harness installed editable from {checkout}, pyproject.toml unchanged")
        return
    command = [ctx.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "-e", f"{checkout}[test]"]
    if ctx.dry_run:
        ctx.log(f"would run {ctx.python} -m pip install -e '{checkout}[test]'")
        return
    ctx.log(f"{ctx.python} -m pip install -e '{checkout}[test]'")
    ctx.run(command, "pip install -e '.[test]'", env=env)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(want + "\n")
    tmp.replace(stamp)


def settle_interpreter(ctx: Context) -> None:
    """Without the python step (``--only``): use the checkout's ``.venv`` an earlier run made
    when the interpreter the set-up runs with lacks the harness's dependencies."""
    checkout = assets.source_checkout()
    if checkout is None or not venv_python(checkout).exists():
        return
    status, _ = ctx.output([ctx.python, "-c", "import harness.images.recipes, harness.doctor"])
    if status != 0:
        ctx.python = str(venv_python(checkout))
