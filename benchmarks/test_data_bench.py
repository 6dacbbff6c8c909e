"""Throughput of the DATA / BDAT / dot-stuffing kernel, compiled and pure side by side.

Messages are realistic text: ~76-octet CRLF lines with an occasional line starting with a dot,
fed in 16 KiB chunks as a socket would deliver them.
"""

from __future__ import annotations

import functools
import random
from types import ModuleType

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from kernels import IMPLS, load_impl

SIZES = {"1KiB": 1024, "64KiB": 64 * 1024, "10MiB": 10 * 1024 * 1024}
CHUNK = 16 * 1024
WORDS = (
    b"the quick brown fox jumps over lazy dog mail relay queue delivery message header "
    b"Received from by with ESMTP id for Subject Date To Cc Message-ID 2024 example.org"
).split()


@functools.cache
def message(size: int, dot_lines: bool = True) -> bytes:
    """About *size* octets of text lines; with *dot_lines*, about 1 line in 50 starts with "."."""
    rng = random.Random(size)
    lines = []
    total = 0
    while total < size:
        line = b" ".join(rng.choices(WORDS, k=14))[:74]
        if dot_lines and rng.random() < 0.02:
            line = b"." + line[1:]
        lines.append(line + b"\r\n")
        total += len(line) + 2
    return b"".join(lines)


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def module(impl: str) -> ModuleType:
    return load_impl("data", impl)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_data_reader(benchmark: BenchmarkFixture, impl: str, size: str) -> None:
    kernel = module(impl)
    body = message(SIZES[size])
    wire = chunks(kernel.dot_stuff(body) + b".\r\nQUIT\r\n")

    def receive() -> bytes:
        reader = kernel.DataReader()
        for chunk in wire:
            reader.feed(chunk)
        assert reader.done
        return reader.content()

    benchmark.group = f"data {size}"
    benchmark.extra_info["bytes"] = sum(map(len, wire))
    assert benchmark(receive) == body


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_bdat_reader(benchmark: BenchmarkFixture, impl: str, size: str) -> None:
    kernel = module(impl)
    body = message(SIZES[size])
    pieces = chunks(body)

    def receive() -> bytes:
        reader = kernel.BdatReader()
        reader.start_chunk(len(body), last=True)
        for piece in pieces:
            reader.feed(piece)
        assert reader.done
        return reader.content()

    benchmark.group = f"bdat {size}"
    benchmark.extra_info["bytes"] = len(body)
    assert benchmark(receive) == body


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_dot_stuff(benchmark: BenchmarkFixture, impl: str, size: str) -> None:
    kernel = module(impl)
    body = message(SIZES[size])  # has dot lines: a new object with them doubled
    benchmark.group = f"dot_stuff {size}"
    benchmark.extra_info["bytes"] = len(body)
    wire = benchmark(kernel.dot_stuff, body)
    assert len(wire) == len(body) + body.count(b"\n.") + body.startswith(b".")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_dot_stuff_noop(benchmark: BenchmarkFixture, impl: str, size: str) -> None:
    kernel = module(impl)
    body = message(SIZES[size], dot_lines=False)  # nothing to change: a scan, no copy
    benchmark.group = f"dot_stuff {size} no-op"
    benchmark.extra_info["bytes"] = len(body)
    assert benchmark(kernel.dot_stuff, body) is body
