"""Chooses between a compiled kernel and its pure-Python twin.

The compiled module ``tachymail.protocol._<name>`` is used by default.
``TACHYMAIL_PURE=1`` forces the twin ``tachymail.protocol.<name>_py``; a
missing extension falls back to the twin with a RuntimeWarning, because the
twin is correct but several times slower.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from types import ModuleType

log = logging.getLogger(__name__)

PURE_ENV = "TACHYMAIL_PURE"

#: kernel name -> "compiled" or "pure", filled as kernels are loaded
loaded: dict[str, str] = {}


def pure_requested() -> bool:
    """True when ``TACHYMAIL_PURE`` asks for the pure-Python twins."""
    return os.environ.get(PURE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def load_kernel(name: str) -> ModuleType:
    """Return the module implementing kernel *name* (compiled unless told otherwise)."""
    if not pure_requested():
        try:
            module = importlib.import_module(f"tachymail.protocol._{name}")
        except ImportError as exc:
            message = (
                f"tachymail: the compiled kernel {name!r} is not built ({exc}); using the "
                f"pure-Python twin, which is several times slower. Install with `pip install .` "
                f"to compile ext/."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning("%s", message)
        else:
            loaded[name] = "compiled"
            return module
    loaded[name] = "pure"
    return importlib.import_module(f"tachymail.protocol.{name}_py")
