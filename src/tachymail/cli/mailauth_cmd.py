"""``tachymail mailauth check``: run the inbound checks on a message file.

What an mx listener in ``enforce`` mode would do with FILE.eml sent by a client at IP that
said HELO NAME and MAIL FROM ADDR: DNS block and allow lists, iprev, SPF, DKIM, ARC and
DMARC, with the ``[mailauth]`` settings of the configuration and every lookup through its
resolver (``[delivery] resolver``, or ``--resolver``). Nothing is recorded (no DMARC
aggregate data) and nothing is sealed.

Output: the Authentication-Results field on stdout, as the server would add it, and one
line on stderr with the action (``accept``, ``reject`` with the reply, ``quarantine``);
with ``--json`` one JSON object on stdout instead, with every result and its details.
Exit status 0 whatever the checks say; 2 with one line on stderr for an unreadable file,
a bad argument or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from tachymail.cli.commands import _config, _fail, _setup_logging
from tachymail.config import ConfigError

__all__ = ["add_mailauth_parser", "cmd_mailauth_check"]


def add_mailauth_parser(sub: Any) -> None:
    """Register ``tachymail mailauth ...`` on the top-level subparsers *sub*."""
    parser = sub.add_parser(
        "mailauth",
        help="inbound authentication tools (SPF, DKIM, DMARC, ARC, iprev, DNSBL)",
        description="Inbound message authentication, as the mx listeners do it ([mailauth]).",
    )
    actions = parser.add_subparsers(dest="mailauth_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="run every check on a message file and print the Authentication-Results field",
        description="Run the inbound checks on FILE (a message as received, headers and "
        "body) as an mx listener in enforce mode would for a client at --ip that said "
        "--helo and --mail-from: DNSBL/DNSWL, iprev, SPF, DKIM, ARC, DMARC. Prints the "
        "Authentication-Results field (stdout) and the action (stderr); --json prints "
        "every result with its details. Exit status 0 whatever the results.",
    )
    check.set_defaults(handler=cmd_mailauth_check)
    check.add_argument("file", metavar="FILE.eml", help="the message ('-': standard input)")
    check.add_argument("--ip", required=True, help="the client's IP address")
    check.add_argument("--helo", required=True, metavar="NAME", help="the HELO/EHLO name")
    check.add_argument(
        "--mail-from",
        required=True,
        metavar="ADDR",
        help="the MAIL FROM address ('' or '<>' for the null sender)",
    )
    check.add_argument(
        "--resolver",
        metavar="HOST:PORT",
        help="DNS server for every lookup (default: [delivery] resolver, else the system's)",
    )
    check.add_argument("--json", action="store_true", help="print every result as JSON")
    check.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")


def _read(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    return Path(name).read_bytes()


def _crlf(content: bytes) -> bytes:
    """Line ends as on the wire (a file saved on Unix has bare LFs; the signatures were
    made over CRLF)."""
    return content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def cmd_mailauth_check(args: argparse.Namespace) -> int:
    """Run the checks and print the results; 2 on a bad file, address or configuration."""
    from tachymail.dns import Resolver
    from tachymail.mailauth.iprev import normal_ip

    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        content = _crlf(_read(args.file))
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror}")
    try:
        ip = str(normal_ip(args.ip))
    except ValueError:
        return _fail(f"--ip: {args.ip!r} is not an IP address")
    _setup_logging(args.log_level)  # DNS failures and the checks' own notes, on stderr
    nameserver = args.resolver or config.delivery.resolver or None
    try:
        resolver = Resolver(nameserver, config.delivery.dns_timeout)
    except ValueError as exc:
        return _fail(f"--resolver: {exc}")
    try:
        report = asyncio.run(_check(config, resolver, content, ip, args.helo, args.mail_from))
    except ValueError as exc:  # the ARC sealing key of the configuration
        return _fail(str(exc))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        sys.stdout.write(report["header"].replace("\r\n", "\n"))
        why = f" ({report['reply']})" if report["reply"] else ""
        print(f"action: {report['action']} at {report['stage']}{why}", file=sys.stderr)
    return 0


async def _check(
    config: Any, resolver: Any, content: bytes, ip: str, helo: str, mail_from: str
) -> dict[str, Any]:
    from tachymail.mailauth.inbound import InboundChecker
    from tachymail.mailauth.results import remove_forged

    checker = InboundChecker(config, resolver, record_reports=False)
    sender = mail_from.strip().removeprefix("<").removesuffix(">")
    connect, iprev, mail = await asyncio.gather(
        checker.connect(ip), checker.iprev(ip), checker.mail(ip, helo, sender)
    )
    verdict = await checker.message(
        ip=ip,
        helo=helo,
        mail_from=sender,
        mail=mail,
        iprev=iprev,
        content=content,
        mode="enforce",
        relay=False,
    )
    # the first refusal the session would send, where it would send it
    stage, action, answer = "data", verdict.action, verdict.reply
    if connect.reply is not None:
        stage, action, answer = "connect", "reject", connect.reply
    elif mail.reply is not None:
        stage, action, answer = "mail", "reject", mail.reply
    header = verdict.headers.decode("ascii", "replace")
    return {
        "authserv_id": checker.authserv_id,
        "header": header,
        "action": action,
        "stage": stage,
        "reply": answer.decode("utf-8", "replace").strip() if answer else None,
        "summary": verdict.summary,
        "allowlisted": connect.allowlisted,
        "listings": [_plain(listing) for listing in connect.listings],
        "iprev": _plain(iprev),
        "spf": _plain(mail.spf),
        "helo": _plain(mail.helo),
        "dkim": [_plain(result) for result in verdict.dkim],
        "arc": _plain(verdict.arc),
        "dmarc": _plain(verdict.dmarc),
        "results": [list(pair) for pair in verdict.results],
        "forged_removed": remove_forged(content, checker.authserv_id)[1],
    }


def _plain(value: Any) -> Any:
    """A result dataclass as a JSON-ready dict (None stays None)."""
    if value is None:
        return None
    return dataclasses.asdict(value)
