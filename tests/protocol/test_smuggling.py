"""SMTP smuggling over a real connection: no fake end-of-data ends a message, ever.

For each sequence the client sends one message whose body contains the fake
terminator followed by a complete second transaction, then the real
"\\r\\n.\\r\\n". A safe server gives exactly one final reply: 550 5.6.0 for a
bare CR/LF (the default), or one 250 with the smuggled text still inside the
message (when normalising). Two 250s would mean a smuggled message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import RawClient
from server import Server, run_cli, running_server

SEQUENCES = {
    "lf-lf": b"\n.\n",
    "lf-cr": b"\n.\r",
    "cr-lf": b"\r.\n",
    "cr-cr": b"\r.\r",
    "lf-crlf": b"\n.\r\n",
    "cr-crlf": b"\r.\r\n",
    "crlf-lf": b"\r\n.\n",
    "crlf-cr": b"\r\n.\r",
    "crlf-crcrlf": b"\r\n.\r\r\n",
    "crcrlf-crcrlf": b"\r\r\n.\r\r\n",
    "null-before": b"\r\n\x00.\r\n",
    "null-after": b"\r\n.\x00\r\n",
}
SMUGGLED = (
    b"MAIL FROM:<smuggled@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nNO SMUGGLING\r\n"
)


def send_with(client: RawClient, fake: bytes) -> bytes:
    client.cmd(b"EHLO x")
    assert client.cmd(b"MAIL FROM:<a@example.com>").startswith(b"250")
    assert client.cmd(b"RCPT TO:<b@example.net>").startswith(b"250")
    assert client.cmd(b"DATA").startswith(b"354")
    client.send(b"Subject: carrier\r\n\r\nTesting" + fake + SMUGGLED + b".\r\n")
    final = client.reply()
    assert client.cmd(b"NOOP") == b"250 2.0.0 Ok", "a second final reply arrived"
    return final


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_fake_terminator_rejected_by_default(server: Server, name: str) -> None:
    client = RawClient(server.port)
    final = send_with(client, SEQUENCES[name])
    client.close()
    if b"\r" in SEQUENCES[name].replace(b"\r\n", b"") or b"\n" in SEQUENCES[name].replace(
        b"\r\n", b""
    ):
        assert final.startswith(b"550 5.6.0"), final
        assert server.queue_count() == 0
        assert "smuggling" in server.log()
    else:  # the NUL sequences have proper CRLFs: one message, with the smuggled text inside
        assert final.startswith(b"250 2.0.0"), final
        assert server.queue_count() == 1


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_fake_terminator_stays_content_when_normalising(tmp_path: Path, name: str) -> None:
    extra = '[policy]\nbare_newline = "normalize"\n'
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        client = RawClient(srv.port)
        final = send_with(client, SEQUENCES[name])
        client.close()
        assert final.startswith(b"250 2.0.0"), final
        [line] = run_cli("queue", "list", "--json", data_dir=srv.data_dir).splitlines()
        entry = json.loads(line)
        assert entry["sender"] == "a@example.com"
        shown = run_cli("queue", "show", entry["id"], "--body", data_dir=srv.data_dir)
        assert "NO SMUGGLING" in shown and "MAIL FROM:<smuggled@example.com>" in shown
