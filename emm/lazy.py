"""Names a package exports without importing their modules until first use.

Why: a package ``__init__`` that imports every submodule makes ``import emm.x.y`` pay for all of them, and
``emm predict`` needs a few names of packages whose other modules pull in scikit-learn, SciPy or MLflow."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each name to the module that defines it; the name
    is imported on first use and then kept in the package, so later lookups are plain attribute reads."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
