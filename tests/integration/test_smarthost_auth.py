"""Credentials for the smarthost (or a route) never leave without verified TLS (finding 8).

A real `tachymail serve` relays to the scripted peer (tests/smtp_peer.py), which offers
AUTH, with or without STARTTLS, and records every AUTH line it receives and whether it came
under TLS. The peer's certificate is made here: self-signed for 127.0.0.1 (the address the
smarthost is configured by), so it verifies only when given as the CA file.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import smtplib
import ssl
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, run_cli, running_server, wait_until
from smtp_peer import Script, SmtpPeer
from tachymail.config import ConfigError, from_dict


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 and its key, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smarthost.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "peer-cert.pem", directory / "peer-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_script(tmp_path: Path) -> tuple[Script, Path]:
    cert, key = make_certificate(tmp_path / "peer-tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return Script(auth=True, tls_context=context), cert


def smarthost_config(port: int, extra: str = "") -> str:
    return (
        f'[delivery]\nsmarthost = "127.0.0.1:{port}"\nsmarthost_auth = "relay:s3cret"\n'
        'retry_schedule = [1]\ndelay_warning = 0\nresolver = "127.0.0.1:9"\n' + extra
    )


def route_config(port: int) -> str:
    return (
        f'[[route]]\ndomain = "dest.example"\nhost = "127.0.0.1:{port}"\nauth = "relay:s3cret"\n'
        '\n[delivery]\nretry_schedule = [1]\ndelay_warning = 0\nresolver = "127.0.0.1:9"\n'
    )


def send(port: int, rcpt: str = "bob@dest.example") -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail(
            "alice@sender.example",
            [rcpt],
            b"From: alice@sender.example\r\nSubject: auth\r\nMessage-ID: <a1@test>\r\n\r\nhi\r\n",
        )


def deferrals(srv: Server) -> list[dict[str, object]]:
    path = srv.data_dir / "delivery.log"
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in entries if e["result"] == "deferred"]


@pytest.mark.parametrize("hop", ["smarthost", "route"])
def test_no_credentials_to_a_peer_without_starttls(tmp_path: Path, hop: str) -> None:
    script = Script(auth=True)  # AUTH offered, STARTTLS not
    with SmtpPeer(script) as peer:
        config = smarthost_config(peer.port) if hop == "smarthost" else route_config(peer.port)
        with running_server(tmp_path, config, hold=False, roles=("mx",)) as srv:
            send(srv.port)
            wait_until(lambda: len(deferrals(srv)) >= 2 or peer.messages, timeout=20)
            assert peer.auth_lines == [], "credentials went out in plaintext"
            assert peer.messages == []
            entry = deferrals(srv)[0]
            assert entry["code"] == 451
            assert "4.7.10" in str(entry["reply"]) and "credentials not sent" in str(entry["reply"])
            assert srv.queue_count() == 1, "the message stays queued"
            [listed] = [
                json.loads(x)
                for x in run_cli("queue", "list", "--json", data_dir=srv.data_dir).splitlines()
            ]
            assert listed["recipients"][0]["status"] == "4.7.10"
            assert "credentials not sent" in srv.log()


def test_no_credentials_to_a_peer_whose_certificate_does_not_verify(tmp_path: Path) -> None:
    script, _cert = tls_script(tmp_path)
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, smarthost_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        send(srv.port)
        wait_until(lambda: len(deferrals(srv)) >= 1 or peer.messages, timeout=20)
        assert peer.auth_lines == [], "credentials went to an unverified peer"
        assert peer.messages == []
        entry = deferrals(srv)[0]
        assert entry["code"] == 451 and "4.7.5" in str(entry["reply"])
        assert srv.queue_count() == 1


def test_credentials_go_under_tls_verified_with_the_configured_ca(tmp_path: Path) -> None:
    script, cert = tls_script(tmp_path)
    with SmtpPeer(script) as peer:
        config = smarthost_config(peer.port, f'smarthost_tls_ca = "{cert}"\n')
        with running_server(tmp_path, config, hold=False, roles=("mx",)) as srv:
            send(srv.port)
            peer.wait_for(1)
            wait_until(lambda: srv.queue_count() == 0)
        assert len(peer.auth_lines) == 1
        under_tls, line = peer.auth_lines[0]
        assert under_tls and line.startswith("AUTH PLAIN ")


def test_config_check_refuses_credentials_that_could_go_unprotected() -> None:
    base = {"smarthost": "relay.example:587", "smarthost_auth": "u:p"}
    with pytest.raises(ConfigError) as refused:
        from_dict({"delivery": {**base, "smarthost_tls_verify": False}})
    assert any("smarthost_tls_verify" in p for p in refused.value.problems)
    with pytest.raises(ConfigError) as refused:
        from_dict({"delivery": {**base, "smarthost_tls": "none"}})
    assert any("smarthost_tls" in p for p in refused.value.problems)
    route = {"domain": "d.example", "host": "10.0.0.1:25", "auth": "u:p"}
    with pytest.raises(ConfigError) as refused:
        from_dict({"route": [{**route, "tls_verify": False}]})
    assert any("route[0].tls_verify" in p for p in refused.value.problems)
    with pytest.raises(ConfigError) as refused:
        from_dict({"delivery": {**base, "smarthost_tls_ca": "/nonexistent/ca.pem"}})
    assert any("smarthost_tls_ca" in p for p in refused.value.problems)
    # Credentials with the defaults: verification is on, nothing to refuse.
    config = from_dict({"delivery": base})
    assert config.delivery.smarthost_tls_verify is None
