"""AUTH brute force (issue 16, finding 6): failures counted across sessions and workers,
a growing tarpit, then 454 4.7.0 without a password check; and 12,288-octet AUTH lines.

Every test talks to a real `tachymail serve` over TLS on loopback. Clients bind to
127.0.0.x source addresses to play several hosts; trusted networks are not exempt.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server import Server, free_port, metric, run_cli, running_server, wait_until

# Long enough that a busy machine still finds the lockout on, short enough to wait out.
LOCKOUT = 5.0


def throttle_config(per_ip: int, per_user: int) -> str:
    return (
        "[auth]\nfailure_delay = 0.02\nmax_failure_delay = 0.2\nmax_failures = 3\n"
        f"max_failures_per_ip = {per_ip}\nmax_failures_per_user = {per_user}\n"
        f"lockout = {LOCKOUT}\nfailure_half_life = 3600.0\n"
        'senders = { alice = ["@example.com"], bob = ["@example.com"] }\n'
    )


class TlsClient:
    """A line-level SMTP client on the smtps listener, from source address *source*."""

    def __init__(self, server: Server, context: ssl.SSLContext, source: str = "127.0.0.1"):
        raw = socket.create_connection(
            ("127.0.0.1", server.ports["smtps"]), timeout=15, source_address=(source, 0)
        )
        self.sock = context.wrap_socket(raw)
        self.reader = self.sock.makefile("rb")
        assert self.reply().startswith(b"220")
        assert self.cmd(b"EHLO client.example").startswith(b"250")

    def reply(self) -> bytes:
        lines = [self.reader.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(self.reader.readline())
        return b"".join(lines)

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def plain(self, user: str, password: str) -> bytes:
        token = base64.b64encode(f"\0{user}\0{password}".encode())
        return self.cmd(b"AUTH PLAIN " + token)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def add_users(server: Server) -> None:
    for name in ("alice", "bob"):
        run_cli("user", "add", name, "--password-stdin", data_dir=server.data_dir, stdin="right\n")


def login(server: Server, context: ssl.SSLContext, user: str, source: str = "127.0.0.1") -> int:
    """The reply code to AUTH PLAIN with *user*'s right password from *source*."""
    client = TlsClient(server, context, source)
    try:
        return int(client.plain(user, "right")[:3])
    finally:
        client.close()


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Server]:
    with running_server(
        tmp_path, throttle_config(per_ip=10, per_user=0), workers=2, roles=("smtps",)
    ) as srv:
        add_users(srv)
        yield srv


def test_parallel_guessing_locks_the_address_out_across_workers(
    two_workers: Server, tls_context: ssl.SSLContext
) -> None:
    srv = two_workers

    def guess(n: int) -> list[bytes]:
        client = TlsClient(srv, tls_context)
        try:
            return [client.plain(f"user{n}", f"guess{i}")[:9] for i in range(3)]
        finally:
            client.close()

    with ThreadPoolExecutor(30) as pool:
        replies = [r for batch in pool.map(guess, range(30)) for r in batch]
    codes = Counter(r[:3] for r in replies)
    assert set(codes) <= {b"535", b"454"}, codes
    assert b"454 4.7.0" in replies
    # Ten failures lock the address; only checks already under way may add a few more.
    assert codes[b"535"] < 10 + 20, codes
    # The right password is refused while the lockout lasts, on every worker.
    assert [login(srv, tls_context, "alice") for _ in range(8)] == [454] * 8
    # ... and works once it is over.
    wait_until(lambda: login(srv, tls_context, "alice") == 235, timeout=LOCKOUT + 15)
    log = srv.log()
    assert "AUTH lockout for 5 seconds: client 127.0.0.1" in log
    assert "locked out for" in log


def test_failures_spread_over_workers_add_up(
    two_workers: Server, tls_context: ssl.SSLContext
) -> None:
    """Ten failures in ten connections, which the kernel spreads over both workers, lock
    the address everywhere: a count per process would see about five each."""
    for n in range(10):
        client = TlsClient(two_workers, tls_context)
        assert client.plain(f"user{n}", "wrong").startswith(b"535 5.7.8")
        client.close()
    assert [login(two_workers, tls_context, "bob") for _ in range(8)] == [454] * 8


def test_a_user_is_locked_out_across_addresses(tmp_path: Path, tls_context: ssl.SSLContext) -> None:
    with running_server(tmp_path, throttle_config(per_ip=0, per_user=4), roles=("smtps",)) as srv:
        add_users(srv)
        for n in range(2, 6):
            client = TlsClient(srv, tls_context, f"127.0.0.{n}")
            assert client.plain("alice", "wrong").startswith(b"535 5.7.8")
            client.close()
        # A fifth address, the right password: refused unchecked.
        client = TlsClient(srv, tls_context, "127.0.0.6")
        assert client.plain("alice", "right").startswith(b"454 4.7.0 Temporary authentication")
        client.close()
        # The lockout is the user's: another user from a guessing address is fine.
        assert login(srv, tls_context, "bob", "127.0.0.2") == 235
        wait_until(lambda: login(srv, tls_context, "alice", "127.0.0.6") == 235, LOCKOUT + 15)
        assert "AUTH lockout for 5 seconds: user 'alice'" in srv.log()


def test_success_forgives_the_users_failures_but_not_the_addresss(
    tmp_path: Path, tls_context: ssl.SSLContext
) -> None:
    with running_server(tmp_path, throttle_config(per_ip=5, per_user=3), roles=("smtps",)) as srv:
        add_users(srv)
        source = "127.0.0.2"

        def attempt(user: str, password: str) -> bytes:
            client = TlsClient(srv, tls_context, source)
            try:
                return client.plain(user, password)[:3]
            finally:
                client.close()

        assert [attempt("alice", "typo") for _ in range(2)] == [b"535"] * 2
        assert attempt("alice", "right") == b"235"
        # Without the success two more failures would make four: alice locked out.
        assert [attempt("alice", "typo") for _ in range(2)] == [b"535"] * 2
        # The address keeps all four; a fifth failure locks it, for every user.
        assert attempt("carol", "guess") == b"535"
        assert attempt("bob", "right") == b"454"
        assert login(srv, tls_context, "alice", "127.0.0.3") == 235  # elsewhere: fine


@pytest.fixture
def server_with_alice(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path, throttle_config(per_ip=50, per_user=50), roles=("smtps",)) as srv:
        add_users(srv)
        yield srv


def plain_token(octets: int) -> bytes:
    """An AUTH PLAIN response for alice with a wrong password, *octets* long in base64."""
    raw = b"\0alice\0" + b"p" * (octets * 3 // 4 - 7)
    token = base64.b64encode(raw)
    assert len(token) == octets
    return token


def test_12000_octet_auth_lines_are_checked(
    server_with_alice: Server, tls_context: ssl.SSLContext
) -> None:
    client = TlsClient(server_with_alice, tls_context)
    line = b"AUTH PLAIN " + plain_token(11988)
    assert len(line) + 2 == 12001
    assert client.cmd(line).startswith(b"535 5.7.8")  # a wrong password, not "too long"
    assert client.cmd(b"AUTH PLAIN") == b"334 \r\n"
    assert client.cmd(plain_token(12000)).startswith(b"535 5.7.8")
    client.close()
    # At the limit on the AUTH command line, and past it with the login right: accepted.
    client = TlsClient(server_with_alice, tls_context)
    token = base64.b64encode(b"\0alice\0right")
    padded = b"AUTH PLAIN " + token + b" " * (12288 - 13 - len(token))
    assert client.cmd(padded).startswith(b"235 2.7.0")
    client.close()


def test_overlong_auth_continuation_ends_the_exchange(
    server_with_alice: Server, tls_context: ssl.SSLContext
) -> None:
    client = TlsClient(server_with_alice, tls_context)
    assert client.cmd(b"AUTH PLAIN") == b"334 \r\n"
    assert (
        client.cmd(plain_token(13000)) == b"500 5.5.6 Authentication Exchange line is too long\r\n"
    )
    # Back in the command state: the next line is a command, not a SASL response.
    assert client.cmd(b"NOOP") == b"250 2.0.0 Ok\r\n"
    assert client.cmd(b"AUTH LOGIN").startswith(b"334 ")
    assert client.cmd(b"A" * 20000).startswith(b"500 5.5.6")
    assert client.cmd(b"NOOP") == b"250 2.0.0 Ok\r\n"
    # Other commands keep the 512-octet limit.
    assert client.cmd(b"NOOP " + b"x" * 600).startswith(b"500 5.5.0")
    assert client.plain("alice", "right").startswith(b"235")
    client.close()


def test_locked_out_smtplib_login_gets_454(tmp_path: Path, tls_context: ssl.SSLContext) -> None:
    with running_server(tmp_path, throttle_config(per_ip=2, per_user=0), roles=("smtps",)) as srv:
        add_users(srv)
        with smtplib.SMTP_SSL("127.0.0.1", srv.ports["smtps"], context=tls_context) as c:
            c.ehlo()
            c.user, c.password = "alice", "wrong"
            # smtplib's login() tries PLAIN, then LOGIN: two failures, the limit.
            for mechanism in ("PLAIN", "LOGIN"):
                with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                    c.auth(mechanism, getattr(c, f"auth_{mechanism.lower()}"))
                assert failed.value.smtp_code == 535
        with (
            smtplib.SMTP_SSL("127.0.0.1", srv.ports["smtps"], context=tls_context) as c,
            pytest.raises(smtplib.SMTPAuthenticationError) as failed,
        ):
            c.login("alice", "right")
        assert failed.value.smtp_code == 454
        assert failed.value.smtp_error.startswith(b"4.7.0")


def test_refusals_are_counted_in_metrics(tmp_path: Path, tls_context: ssl.SSLContext) -> None:
    """Lockouts, unchecked attempts, unknown local users and unowned senders: /metrics."""
    port = free_port()
    extra = (
        throttle_config(per_ip=2, per_user=0)
        + f'[metrics]\naddress = "127.0.0.1:{port}"\n[policy]\nlocal_domains = ["here.example"]\n'
    )
    with running_server(tmp_path, extra, roles=("mx", "smtps")) as srv:
        add_users(srv)
        with smtplib.SMTP_SSL("127.0.0.1", srv.ports["smtps"], context=tls_context) as client:
            client.login("bob", "right")
            assert client.mail("ceo@elsewhere.example")[0] == 553
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo()
            client.mail("a@example.org")
            assert client.rcpt("nobody@here.example")[0] == 550
        for password in ("wrong", "wrong", "right"):
            client = TlsClient(srv, tls_context)
            client.plain("alice", password)
            client.close()
        counted = {
            ("tachymail_auth_lockouts_total", "scope", "ip"): 1.0,
            ("tachymail_auth_locked_attempts_total", "", ""): 1.0,
            ("tachymail_auth_failures_total", "", ""): 2.0,
            ("tachymail_recipients_rejected_total", "reason", "unknown_user"): 1.0,
            ("tachymail_senders_rejected_total", "reason", "not_owned"): 1.0,
        }
        for (name, label, value), expected in counted.items():
            labels = {label: value} if label else {}
            wait_until(lambda: metric(port, name, **labels) == expected)  # noqa: B023
