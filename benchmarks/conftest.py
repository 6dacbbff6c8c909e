"""Benchmarks share the tests' kernel loader (both implementations of each kernel)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
