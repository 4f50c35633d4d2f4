"""The guest's Python programs (harness/data/guest/*.py), imported on the host so that tests can call
their functions without a guest. They are scripts the images copy in, not a package: each is
loaded from its file."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from helpers import REPO

#: Where the images' guest programs live.
GUEST = REPO / "harness" / "data" / "guest"


def load(name: str) -> ModuleType:
    """``harness/data/guest/<name>.py`` as a new module object (not entered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, GUEST / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
