"""Command-line kernel: a pipelined SMTP transaction read, classified and parsed.

The workload is what the server does with one pipelined client write: the batch goes into a
LineReader as one chunk, every line is read and classified with parse_command, and the MAIL and
RCPT arguments are parsed.  "1 transaction" is one EHLO .. QUIT batch (12 commands);
"100 transactions" is 100 of them in a single chunk, for the steady-state rate.  Throughput is
reported per command (items).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from kernels import IMPLS, load_impl

TRANSACTION = (
    b"EHLO client.example.org\r\n"
    b"MAIL FROM:<sender@example.org> SIZE=123456 BODY=8BITMIME\r\n"
    b"RCPT TO:<alice@example.net>\r\n"
    b"RCPT TO:<bob.smith@example.net>\r\n"
    b"RCPT TO:<carol@mail.example.com>\r\n"
    b"RCPT TO:<dave+tag@example.net>\r\n"
    b"RCPT TO:<eve@example.org>\r\n"
    b"DATA\r\n"
    b"RSET\r\n"
    b"NOOP\r\n"
    b"RSET\r\n"
    b"QUIT\r\n"
)
COMMANDS = TRANSACTION.count(b"\r\n")
SIZES = {"1 transaction": 1, "100 transactions": 100}


def session_reader(cmd: ModuleType) -> Callable[[bytes], tuple[int, int]]:
    """What the server does with one chunk; returns (commands, recipients) as a check."""
    line_reader, parse_command = cmd.LineReader, cmd.parse_command
    parse_mail, parse_rcpt = cmd.parse_mail, cmd.parse_rcpt
    verb_mail, verb_rcpt = cmd.VERB_MAIL, cmd.VERB_RCPT

    def run(chunk: bytes) -> tuple[int, int]:
        reader = line_reader(512)
        reader.feed(chunk)
        commands = recipients = 0
        while (item := reader.readline()) is not None:
            verb, args = parse_command(item[0])
            if verb == verb_mail:
                parse_mail(args)
            elif verb == verb_rcpt:
                recipients += len(parse_rcpt(args)[0]) > 0
            commands += 1
        return commands, recipients

    return run


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_pipelined_batch(benchmark: BenchmarkFixture, impl: str, size: str) -> None:
    cmd = load_impl("commands", impl)
    chunk = TRANSACTION * SIZES[size]
    benchmark.group = f"commands {size}"
    benchmark.extra_info["bytes"] = len(chunk)
    benchmark.extra_info["items"] = COMMANDS * SIZES[size]
    result = benchmark(session_reader(cmd), chunk)
    assert result == (COMMANDS * SIZES[size], 5 * SIZES[size])
