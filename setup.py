"""Build script for the compiled hot path.

Every ``ext/<name>.pyx`` becomes the extension module
``tachymail.protocol._<name>``; its pure-Python twin is
``tachymail.protocol.<name>_py``.  Set ``TACHYMAIL_EXT_ONLY=a,b`` to build only
some of them (handy while working on one kernel).
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
only = {n for n in os.environ.get("TACHYMAIL_EXT_ONLY", "").split(",") if n}

extensions = [
    Extension(
        f"tachymail.protocol._{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"],
    )
    for pyx in sorted((HERE / "ext").glob("*.pyx"))
    if not only or pyx.stem in only
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=[str(HERE / "ext")],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
        annotate=bool(os.environ.get("TACHYMAIL_ANNOTATE")),
    ),
)
