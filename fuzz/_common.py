"""Shared pieces of the atheris harnesses: loading both kernels and fragmenting input.

Each harness is a script run by ``./dev fuzz`` (``fuzz/run.py``); they share this module, which
is imported from the harness's own directory.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import atheris


def load_twins(kernel: str) -> tuple[ModuleType, ModuleType]:
    """(compiled, pure) modules of *kernel*; the pure twin is instrumented for coverage.

    The compiled kernel is not instrumented (it is built without libFuzzer's coverage pass),
    so the fuzzer is guided by the twin's branches and checks the kernel against it.
    """
    compiled = importlib.import_module(f"tachymail.protocol._{kernel}")
    with atheris.instrument_imports(include=["tachymail"]):
        pure = importlib.import_module(f"tachymail.protocol.{kernel}_py")
    return compiled, pure


def option(data: bytes, index: int) -> int:
    """Option byte *index* of an input (0 past its end): harnesses read options from the front
    explicitly, so a seed file is easy to write by hand (options, split points, stream)."""
    return data[index] if index < len(data) else 0


def fragments(fdp: atheris.FuzzedDataProvider, data: bytes, most: int = 16) -> list[bytes]:
    """*data* cut into pieces at split points the fuzzer chooses (empty pieces included)."""
    count = fdp.ConsumeIntInRange(0, most)
    cuts = sorted(fdp.ConsumeIntInRange(0, len(data)) for _ in range(count))
    pieces = []
    last = 0
    for cut in cuts:
        pieces.append(data[last:cut])
        last = cut
    pieces.append(data[last:])
    return pieces


def as_buffer(piece: bytes, kind: int) -> bytes | bytearray | memoryview:
    """*piece* as bytes (0), bytearray (1) or a memoryview of a larger buffer (2): the kernels
    take any bytes-like object and the compiled ones read it in place."""
    if kind == 1:
        return bytearray(piece)
    if kind == 2:
        return memoryview(b"<" + piece + b">")[1:-1]
    return piece


def outcome(call: Callable[[], Any], allowed: tuple[type[BaseException], ...]) -> tuple[str, Any]:
    """("ok", result) or ("raised", exception) for one of the *allowed* (documented) types.

    Any other exception propagates, which the fuzzer reports as a crash.
    """
    try:
        return ("ok", call())
    except allowed as exc:
        return ("raised", (type(exc).__name__, exc.args))


def agree(what: str, compiled: object, pure: object, data: bytes) -> None:
    """Fail (a crash for the fuzzer) when the two implementations disagree."""
    if compiled != pure:
        raise AssertionError(
            f"compiled and pure twin disagree on {what}:\n"
            f"  compiled: {compiled!r}\n  pure:     {pure!r}\n  input: {data!r}"
        )


def main(test_one_input: Callable[[bytes], None]) -> None:
    """Run the fuzzer on *test_one_input* with libFuzzer's command line (sys.argv)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
