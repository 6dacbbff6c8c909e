"""`tachymail sendmail`: the sendmail command line that cron, PHP's mail() and monitoring
scripts call, and `mailq` when the script is run through a symlink of that name.

A message read from standard input is submitted over SMTP to the running server's
first mx listener, as a trusted local client (from 127.0.0.1, or ::1); when nothing
answers there (the server is down), it is written straight into the queue with the
queue's own API, and the server delivers it when it starts. Exit statuses are
sendmail's (sysexits.h): 0 sent or queued, 64 usage, 65 message refused (5xx), 67 a
recipient refused (5xx; the others got the message), 74 the queue could not be
written, 75 try again later (4xx, a dropped connection, a full queue), 78 bad
configuration.

The configuration is the one of ``-c FILE``, else ``$TACHYMAIL_CONFIG``, else
``/etc/tachymail/tachymail.toml`` when it exists, else the embedded defaults: programs
that call sendmail pass no tachymail options.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import getpass
import ipaddress
import os
import re
import smtplib
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn

from tachymail.config import Config, ConfigError, load

#: where sendmail looks for the configuration when no -c is given (after $TACHYMAIL_CONFIG)
SYSTEM_CONFIG = Path("/etc/tachymail/tachymail.toml")

#: seconds to wait for the server at each SMTP step (a hung server is a temporary failure)
SMTP_TIMEOUT = 120.0

_CONNECT_TIMEOUT = 10.0
_EOL = re.compile(rb"\r\n|\n|\r")
_ADDRESS_HEADERS = (b"to", b"cc", b"bcc")


class Usage(Exception):
    """A command line sendmail cannot act on: exit status 64 (EX_USAGE)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Usage(message)


def build_parser(prog: str = "tachymail sendmail") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        add_help=False,  # -h is sendmail's hop count; --help still helps
        description="Submit a message read from standard input, as sendmail does: to the "
        "running tachymail (its first mx listener, as a trusted local client), or straight "
        "into its queue when the server is down (delivered when it starts).",
        epilog="Configuration: -c FILE, else $TACHYMAIL_CONFIG, else "
        f"{SYSTEM_CONFIG} when it exists, else the embedded defaults. Exit status "
        "(sysexits.h): 0 sent or queued, 64 usage, 65 message refused, 67 a recipient "
        "refused, 74 queue not writable, 75 try again later, 78 bad configuration. "
        "Ignored for compatibility: -o options other than -oi, -U, -n, -m, -G, -L, -X, -h. "
        "As /usr/sbin/sendmail: ln -s $(command -v tachymail) /usr/sbin/sendmail (and "
        "/usr/bin/mailq): the name it is called by picks the mode.",
    )
    parser.add_argument("--help", action="help", help="show this help message and exit")
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT", help="envelope recipients")
    parser.add_argument(
        "-t",
        dest="from_headers",
        action="store_true",
        help="take recipients from the To, Cc and Bcc headers too (Bcc is removed)",
    )
    parser.add_argument(
        "-f", "-r", dest="sender", metavar="SENDER", help="envelope sender ('<>': a bounce)"
    )
    parser.add_argument("-F", dest="fullname", metavar="NAME", help="sender's full name (From:)")
    parser.add_argument(
        "-i", dest="ignore_dots", action="store_true", help="a line of one '.' is not the end"
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTION",
        help="-oi is -i; other -o options are ignored",
    )
    parser.add_argument(
        "-b",
        dest="mode",
        default="m",
        metavar="MODE",
        help="-bm read a message (default), -bs speak SMTP on stdin/stdout, -bp list the "
        "queue (mailq)",
    )
    parser.add_argument(
        "-N", dest="notify", metavar="DSN", help="NOTIFY: never or success,failure,delay"
    )
    parser.add_argument(
        "-R",
        dest="ret",
        choices=["full", "hdrs"],
        type=str.lower,
        help="RET: return the full message or headers only in a bounce",
    )
    parser.add_argument("-V", dest="envid", metavar="ENVID", help="ENVID for delivery reports")
    parser.add_argument(
        "-B",
        dest="body",
        metavar="TYPE",
        type=str.upper,
        choices=["7BIT", "8BITMIME"],
        help="the body type",
    )
    parser.add_argument("-v", dest="verbose", action="store_true", help="show the SMTP dialogue")
    parser.add_argument("-c", "--config", metavar="FILE", help="tachymail TOML configuration")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (queue)")
    for flag in ("-U", "-n", "-m", "-G"):
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("-L", "-X", "-h"):
        parser.add_argument(flag, metavar="VALUE", help=argparse.SUPPRESS)
    return parser


def config_path(given: str | None) -> str | None:
    """-c FILE, else $TACHYMAIL_CONFIG, else SYSTEM_CONFIG if it exists, else None."""
    if given:
        return given
    if os.environ.get("TACHYMAIL_CONFIG"):
        return os.environ["TACHYMAIL_CONFIG"]
    return str(SYSTEM_CONFIG) if SYSTEM_CONFIG.exists() else None


def _say(message: str) -> None:
    print(f"sendmail: {message}", file=sys.stderr)


def main(argv: Sequence[str], prog: str = "tachymail sendmail") -> int:
    """Run sendmail with *argv* (without the program name); returns the exit status."""
    parser = build_parser(prog)
    try:
        args = parser.parse_intermixed_args(list(argv))
        if args.mode not in ("m", "s", "p"):
            raise Usage(f"-b{args.mode} is not supported (use -bm, -bs or -bp)")
    except Usage as exc:
        parser.print_usage(sys.stderr)
        _say(str(exc))
        return os.EX_USAGE
    try:
        config = load(config_path(args.config))
    except ConfigError as exc:
        _say(f"invalid configuration:\n{exc}")
        return os.EX_CONFIG
    if args.data_dir:
        config.server.data_dir = args.data_dir
    if args.mode == "p":
        return mailq(config)
    if args.mode == "s":
        return _speak_smtp(config)
    ignore_dots = args.ignore_dots or "i" in args.options
    try:
        submission = _read_submission(args, config, read_message(sys.stdin.buffer, ignore_dots))
    except Usage as exc:
        _say(str(exc))
        return os.EX_USAGE
    return submit(submission, config, verbose=args.verbose)


def mailq(config: Config) -> int:
    """`sendmail -bp` and the `mailq` symlink: the queue as postqueue -p prints it."""
    from tachymail.cli import commands

    namespace = argparse.Namespace(queue_command="mailq", json=False)
    return commands.queue_read_with(namespace, config)


def mailq_main(argv: Sequence[str]) -> int:
    """A `mailq` symlink to the tachymail script: [-c FILE] [--data-dir DIR]."""
    parser = argparse.ArgumentParser(prog="mailq", description="Print the tachymail queue.")
    parser.add_argument("-c", "--config", metavar="FILE", help="tachymail TOML configuration")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (queue)")
    args = parser.parse_args(list(argv))
    try:
        config = load(config_path(args.config))
    except ConfigError as exc:
        print(f"mailq: invalid configuration:\n{exc}", file=sys.stderr)
        return os.EX_CONFIG
    if args.data_dir:
        config.server.data_dir = args.data_dir
    return mailq(config)


# --- the message -------------------------------------------------------------------------


@dataclass(slots=True)
class Submission:
    """A message ready to submit: envelope and content (CRLF lines, not dot-stuffed)."""

    sender: str
    recipients: list[str]
    content: bytes
    mail_params: dict[str, str] = field(default_factory=dict)
    rcpt_params: dict[str, str] = field(default_factory=dict)


def read_message(stream: BinaryIO, ignore_dots: bool) -> bytes:
    """The message on *stream*: up to its end, or (unless *ignore_dots*, -i) up to a line
    holding a single dot, which is not part of it; reading stops there, as sendmail's does,
    so a writer that sends the dot and waits for us is not left hanging."""
    if ignore_dots:
        return stream.read()
    lines: list[bytes] = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def _read_submission(args: argparse.Namespace, config: Config, raw: bytes) -> Submission:
    """The envelope and content from the options and standard input; raises Usage when
    there is no recipient or an option's value is malformed."""
    hostname = config.server.hostname
    lines = _EOL.split(raw)
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ending the last line
    header_end = lines.index(b"") if b"" in lines else len(lines)
    if header_end and not _looks_like_header(lines[0]):
        header_end = 0  # no header section at all: everything is body
    header, body = lines[:header_end], lines[header_end:]
    if body and body[0] == b"":
        body = body[1:]
    fields = _fields(header)

    recipients = [_qualify(r, hostname) for arg in args.recipients for r in _split_list(arg)]
    if args.from_headers:
        for name, value in fields:
            if name in _ADDRESS_HEADERS:
                text = value.decode("utf-8", "surrogateescape")
                recipients += [
                    _qualify(addr, hostname) for _, addr in email.utils.getaddresses([text]) if addr
                ]
    recipients = list(dict.fromkeys(r for r in recipients if r))  # once each, in order
    if not recipients:
        raise Usage("no recipients given (name them, or use -t with To/Cc/Bcc headers)")

    user = _login()
    if args.sender is None:
        sender = f"{user}@{hostname}"
    else:
        sender = "" if args.sender.strip() in ("", "<>") else _qualify(args.sender, hostname)

    present = {name for name, _ in fields}
    header = _without_bcc(header)
    added: list[bytes] = []
    if b"from" not in present:
        author = sender or f"MAILER-DAEMON@{hostname}"
        added.append(
            b"From: " + email.utils.formataddr((_fullname(args.fullname), author)).encode()
        )
    if b"date" not in present:
        added.append(b"Date: " + email.utils.formatdate(localtime=True).encode())
    if b"message-id" not in present:
        added.append(b"Message-ID: " + email.utils.make_msgid(domain=hostname).encode())
    content = b"\r\n".join([*header, *added, b"", *body]) + b"\r\n"

    mail_params: dict[str, str] = {}
    if args.body:
        mail_params["BODY"] = args.body
    elif not content.isascii():
        mail_params["BODY"] = "8BITMIME"
    if not sender.isascii() or not all(r.isascii() for r in recipients):
        mail_params["SMTPUTF8"] = ""
    if args.ret:
        mail_params["RET"] = args.ret.upper()
    if args.envid:
        mail_params["ENVID"] = _xtext(args.envid)
    rcpt_params: dict[str, str] = {}
    if args.notify:
        notify = [n.strip().upper() for n in args.notify.split(",")]
        allowed = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
        if not set(notify) <= allowed or ("NEVER" in notify and len(notify) > 1):
            raise Usage(f"-N {args.notify}: say never, or some of success,failure,delay")
        rcpt_params["NOTIFY"] = ",".join(notify)
    return Submission(sender, recipients, content, mail_params, rcpt_params)


def _looks_like_header(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon) and bool(name) and all(33 <= c <= 126 and c != 58 for c in name)


def _fields(header: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(lower-case name, unfolded value) of each header field."""
    out: list[tuple[bytes, bytes]] = []
    for line in header:
        if line[:1] in (b" ", b"\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + b" " + line.strip())
        else:
            name, _, value = line.partition(b":")
            out.append((name.strip().lower(), value.strip()))
    return out


def _without_bcc(header: list[bytes]) -> list[bytes]:
    """The header lines without any Bcc field (and its continuation lines)."""
    kept: list[bytes] = []
    dropping = False
    for line in header:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.partition(b":")[0].strip().lower() == b"bcc"
        if not dropping:
            kept.append(line)
    return kept


def _split_list(arg: str) -> list[str]:
    # "a@x, b@y" in one argument is two recipients, as sendmail takes it
    return [addr for _, addr in email.utils.getaddresses([arg]) if addr] or [arg.strip()]


def _qualify(address: str, hostname: str) -> str:
    """A bare local part ("root") gets our hostname, as sendmail's $myorigin does."""
    address = address.strip().strip("<>")
    if address and "@" not in address:
        return f"{address}@{hostname}"
    return address


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def _fullname(given: str | None) -> str:
    if given is not None:
        return given
    with contextlib.suppress(ImportError, KeyError):
        import pwd

        return pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0]
    return ""


def _xtext(text: str) -> str:
    """RFC 3461 xtext: '+', '=' and anything outside 33..126 as +XX."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in text)


# --- submitting ----------------------------------------------------------------------------


def _mx_address(config: Config) -> tuple[str, int, tuple[str, int] | None]:
    """(host, port, source address) of the first mx listener; a wildcard address is reached
    on loopback, and the connection comes from loopback, a trusted network by default."""
    listener = next((lst for lst in config.listeners if lst.role == "mx"), None)
    if listener is None:
        raise ConnectionRefusedError("no mx listener is configured")
    host, port = listener.host, listener.port
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, port, None
    return host, port, ("::1" if ip.version == 6 else "127.0.0.1", 0)


class _NotListening(Exception):
    """The server did not take the connection (it is down, or not taking mail)."""


def submit(submission: Submission, config: Config, *, verbose: bool = False) -> int:
    """Submit over SMTP, or into the queue when the server is not there; the exit status."""
    try:
        return _submit_smtp(submission, config, verbose)
    except _NotListening as exc:
        if verbose:
            _say(f"the server is not answering ({exc}); writing into the queue")
        return _submit_queue(submission, config)


def _submit_smtp(submission: Submission, config: Config, verbose: bool) -> int:
    host, port, source = _mx_address(config)
    try:
        client = smtplib.SMTP(
            host,
            port,
            local_hostname=config.server.hostname,
            timeout=_CONNECT_TIMEOUT,
            source_address=source,
        )
    except (OSError, smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected) as exc:
        raise _NotListening(f"{host}:{port}: {exc}") from exc
    try:
        if verbose:
            client.set_debuglevel(1)
        client.sock.settimeout(SMTP_TIMEOUT)  # type: ignore[union-attr]
        return _transaction(client, submission)
    except smtplib.SMTPServerDisconnected as exc:
        _say(f"the server closed the connection: {exc}; try again later")
        return os.EX_TEMPFAIL
    except smtplib.SMTPResponseException as exc:  # DATA answered with other than 354
        return _refused("DATA", exc.smtp_code, exc.smtp_error)
    except UnicodeError:  # a non-ASCII address, and the server offers no SMTPUTF8
        _say("the server does not take non-ASCII addresses (no SMTPUTF8); not sent")
        return os.EX_DATAERR
    except (OSError, smtplib.SMTPException) as exc:
        _say(f"SMTP with {host}:{port} failed: {exc}; try again later")
        return os.EX_TEMPFAIL
    finally:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            client.quit()
        client.close()


def _transaction(client: smtplib.SMTP, submission: Submission) -> int:
    code, reply = client.ehlo()
    if code != 250:
        code, reply = client.helo()
        if code != 250:
            return _refused("HELO", code, reply)
    mail_options = [
        f"{name}={value}" if value else name
        for name, value in submission.mail_params.items()
        if _offered(client, name)
    ]
    rcpt_options = [f"{k}={v}" for k, v in submission.rcpt_params.items() if client.has_extn("dsn")]
    code, reply = client.mail(submission.sender, mail_options)
    if code != 250:
        return _refused("MAIL FROM", code, reply)
    refused: dict[str, tuple[int, bytes]] = {}
    for rcpt in submission.recipients:
        code, reply = client.rcpt(rcpt, rcpt_options)
        if code not in (250, 251):
            refused[rcpt] = (code, reply)
    for rcpt, (code, reply) in refused.items():
        _say(f"<{rcpt}>: {code} {reply.decode('utf-8', 'replace')}")
    if len(refused) == len(submission.recipients):
        client.rset()
        temporary = any(code < 500 for code, _ in refused.values())
        return os.EX_TEMPFAIL if temporary else os.EX_NOUSER
    code, reply = client.data(submission.content)
    if code != 250:
        return _refused("DATA", code, reply)
    if refused:
        # Sent to the others: asking the caller to retry would send it to them twice.
        return os.EX_TEMPFAIL if any(c < 500 for c, _ in refused.values()) else os.EX_NOUSER
    return os.EX_OK


def _offered(client: smtplib.SMTP, param: str) -> bool:
    extension = {"BODY": "8bitmime", "SMTPUTF8": "smtputf8", "RET": "dsn", "ENVID": "dsn"}
    return client.has_extn(extension[param])


def _refused(step: str, code: int, reply: bytes | str) -> int:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    _say(f"{step} refused: {code} {text}")
    return os.EX_TEMPFAIL if 400 <= code < 500 else os.EX_DATAERR


def _submit_queue(submission: Submission, config: Config) -> int:
    """Write the message into the queue (the server is down); the exit status.

    Only into an existing data directory: a wrong or missing configuration must not start
    a queue nobody reads.
    """
    import lmdb

    from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
    from tachymail.queue.store import MiB, QueueIdTaken, QueueStore, StorageFull, put_message

    data = config.data_path
    if not data.is_dir():
        _say(f"the server is not running and there is no data directory {data}; not sent")
        return os.EX_TEMPFAIL
    now = time.time()
    queue_id = new_queue_id()
    received = (
        f"Received: by {config.server.hostname} (Tachymail sendmail, from userid "
        f"{os.getuid()})\r\n\tid {queue_id}; {email.utils.formatdate(now)}\r\n"
    ).encode()
    content = received + submission.content
    envelope = Envelope(
        id=queue_id,
        sender=submission.sender,
        recipients=[
            Recipient(r, params=dict(submission.rcpt_params)) for r in submission.recipients
        ],
        mail_params=dict(submission.mail_params),
        arrival=now,
        size=len(content),
        client_ip="127.0.0.1",
        helo=config.server.hostname,
        listener="sendmail",
    )
    try:
        store = QueueStore(
            data / "queue",
            max_map_size=config.queue.max_map_size_mb * MiB,
        )
    except (lmdb.Error, OSError) as exc:
        _say(f"cannot open the queue in {data / 'queue'}: {exc}")
        return os.EX_IOERR
    try:
        [outcome] = store.apply([put_message(envelope, content)])
    except StorageFull as exc:
        _say(f"the queue is full ({exc}); try again later")
        return os.EX_TEMPFAIL
    except (lmdb.Error, OSError) as exc:
        _say(f"cannot write the queue in {data / 'queue'}: {exc}")
        return os.EX_IOERR
    finally:
        store.close()
    if isinstance(outcome, QueueIdTaken):
        _say(f"{outcome}; try again")
        return os.EX_TEMPFAIL
    print(f"sendmail: queued as {queue_id} (the server is not running)", file=sys.stderr)
    return os.EX_OK


# --- -bs: SMTP on standard input and output --------------------------------------------------


def _speak_smtp(config: Config) -> int:
    """-bs: relay the SMTP dialogue on stdin/stdout to the running server, byte for byte.

    With the server down, the client reads a 421 greeting and the status is 75.
    """
    try:
        host, port, source = _mx_address(config)
        sock = socket.create_connection((host, port), _CONNECT_TIMEOUT, source_address=source)
    except OSError as exc:
        sys.stdout.buffer.write(
            b"421 4.3.2 " + f"mail server not available: {exc}".encode() + b"\r\n"
        )
        sys.stdout.buffer.flush()
        return os.EX_TEMPFAIL
    sock.settimeout(None)

    def upstream() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(sys.stdin.fileno(), 65536):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

    # Daemon: a client that keeps stdin open after QUIT must not keep us waiting.
    threading.Thread(target=upstream, daemon=True).start()
    out = sys.stdout.buffer
    try:
        while chunk := sock.recv(65536):
            out.write(chunk)
            out.flush()
    except OSError:
        return os.EX_TEMPFAIL
    finally:
        sock.close()
    return os.EX_OK
