"""The command-line syntax of ``tachymail bench`` and ``tachymail sink``.

Only the standard library is imported here: ``tachymail --help`` builds these
parsers without loading the event loop or the kernels.

Syntax, as docs/load-testing.md documents it:

* a size is octets, with an optional binary suffix ``k`` (KiB) or ``m`` (MiB):
  ``1024``, ``1k``, ``64K``, ``2m``;
* a size mix is ``SIZE:WEIGHT,...`` (``1k:70,10k:25,100k:5``); weights are
  relative and need not add up to 100; a single size needs no weight;
* an address template may use ``{n}`` (the message number, from 0, unique
  across processes) and ``{r}`` (the recipient's index in its message);
* a reply mix entry is ``CODE:PERCENT`` (``451:5%`` or ``451:5``), CODE a 4xx
  or 5xx reply; the entries of one command add up to at most 100%;
* a scripted reply is ``ADDR[@STAGE]=REPLY``: ADDR an IP address or a network
  (``127.0.0.2``, ``127.0.0.0/24``), STAGE the command answered (``mail``, the
  default, ``rcpt`` or ``data`` for the end of data), REPLY one reply line,
  ``CODE[ TEXT]`` (``421 4.7.28 Our system has detected an unusual rate``).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import string
from collections.abc import Callable
from typing import NamedTuple, TypeVar

T = TypeVar("T")

_SIZE = re.compile(r"(\d+)\s*(k|kb|kib|m|mb|mib)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_size(text: str) -> int:
    """Octets from ``1024``, ``1k`` or ``2m`` (k = 1024, m = 1024²); ValueError otherwise."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 1024, 1k, 64k, 2m)")
    unit = (match.group(2) or "")[:1].lower()
    return int(match.group(1)) * _UNITS[unit]


def parse_size_mix(text: str) -> list[tuple[int, float]]:
    """``1k`` → [(1024, 1.0)]; ``1k:70,10k:30`` → [(1024, 70.0), (10240, 30.0)].

    Raises ValueError naming the bad entry: a size of 0, a negative or zero
    weight, or a weight missing from an entry of a mix of several sizes.
    """
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise ValueError("empty size")
    mix: list[tuple[int, float]] = []
    for entry in entries:
        size_text, sep, weight_text = entry.partition(":")
        size = parse_size(size_text)
        if size <= 0:
            raise ValueError(f"{entry!r}: the size must be at least 1 octet")
        if not sep:
            if len(entries) > 1:
                raise ValueError(f"{entry!r}: give every size of a mix a weight (SIZE:WEIGHT)")
            weight = 1.0
        else:
            try:
                weight = float(weight_text.rstrip("%"))
            except ValueError:
                raise ValueError(f"{entry!r}: the weight must be a number") from None
            if not weight > 0:
                raise ValueError(f"{entry!r}: the weight must be positive")
        mix.append((size, weight))
    return mix


def parse_reply_mix(values: list[str] | None) -> list[tuple[int, float]]:
    """[``"451:5%"``, ``"550:1"``] → [(451, 5.0), (550, 1.0)]; ValueError names the entry."""
    mix: list[tuple[int, float]] = []
    for value in values or []:
        code_text, sep, pct_text = value.partition(":")
        if not sep or not code_text.strip().isdigit():
            raise ValueError(f"{value!r} is not CODE:PERCENT (example: 451:5%)")
        code = int(code_text)
        if not 400 <= code <= 599:
            raise ValueError(f"{value!r}: the reply code must be 4xx or 5xx")
        try:
            pct = float(pct_text.strip().rstrip("%"))
        except ValueError:
            raise ValueError(f"{value!r}: the percentage must be a number") from None
        if not 0 <= pct <= 100:
            raise ValueError(f"{value!r}: the percentage must be between 0 and 100")
        mix.append((code, pct))
    total = sum(p for _, p in mix)
    if total > 100:
        raise ValueError(f"the reply mix adds up to {total:g}%, more than 100%")
    return mix


_SCRIPTED_REPLY = re.compile(r"([2-5]\d\d)(?: +([\x20-\x7e]*))?")
#: the commands a --reply-for may answer (the greeting has its own option)
SCRIPT_STAGES = ("mail", "rcpt", "data")


class ScriptedReply(NamedTuple):
    network: str  # "127.0.0.2/32"
    stage: str  # greeting, mail, rcpt or data
    code: int
    line: str  # the reply line without its CRLF


def parse_scripted_reply(text: str, greeting: bool = False) -> ScriptedReply:
    """``ADDR[@STAGE]=REPLY`` → a ScriptedReply; ValueError naming the mistake.

    ``127.0.0.2=421 4.7.28 Slow down`` → ("127.0.0.2/32", "mail", 421, "421 4.7.28 Slow
    down"). CODE must be 4xx or 5xx (or 220 for a *greeting*, which takes no STAGE); a
    REPLY of a bare code gets the text ``X.0.0 Sink says CODE``.
    """
    target, sep, reply = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not ADDR=REPLY (example: 127.0.0.2=421 4.7.28 Slow down)")
    addr, at, stage = target.partition("@")
    stage = stage.strip().lower()
    if greeting:
        if at:
            raise ValueError(f"{text!r}: a greeting takes no @STAGE")
        stage = "greeting"
    elif not at:
        stage = "mail"
    elif stage not in SCRIPT_STAGES:
        raise ValueError(f"{text!r}: the stage must be one of {', '.join(SCRIPT_STAGES)}")
    try:
        network = ipaddress.ip_network(addr.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r}: {addr.strip()!r} is not an IP address or network") from None
    match = _SCRIPTED_REPLY.fullmatch(reply.strip())
    if match is None:
        raise ValueError(f"{text!r}: the reply must be CODE[ TEXT], one line of printable ASCII")
    code = int(match.group(1))
    if not (400 <= code <= 599 or (greeting and code == 220)):
        allowed = "220, 4xx or 5xx" if greeting else "4xx or 5xx"
        raise ValueError(f"{text!r}: the reply code must be {allowed}")
    rest = (match.group(2) or "").strip() or f"{code // 100}.0.0 Sink says {code}"
    line = f"{code} {rest}"
    if len(line) > 510:  # RFC 5321 4.5.3.1.5: 512 octets with the CRLF
        raise ValueError(f"{text!r}: the reply is longer than 510 characters")
    return ScriptedReply(str(network), stage, code, line)


def _checked_greeting(text: str) -> str:
    parse_scripted_reply(text, greeting=True)
    return text


def _checked_scripted(text: str) -> str:
    parse_scripted_reply(text)
    return text


def check_address_template(text: str) -> str:
    """*text* itself when it uses no placeholder other than ``{n}`` and ``{r}``."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    unknown = names - {"n", "r"}
    if unknown:
        raise ValueError(
            f"{text!r}: unknown placeholder {{{sorted(unknown)[0]}}} (use {{n}}, {{r}})"
        )
    if "@" not in text:
        raise ValueError(f"{text!r} is not an address (no @)")
    return text


def _argtype(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Wrap a parser so that argparse reports its ValueError as a usage error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"{text} must be positive")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"{text} must not be negative")
    return value


def _checked_reply(text: str) -> str:
    parse_reply_mix([text])
    return text


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tachymail bench`` (the generator reads them in ``BenchConfig``)."""
    parser.add_argument("target", metavar="HOST:PORT", help="the SMTP server to load")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--messages", type=_argtype(_positive_int), metavar="N", help="send N messages"
    )
    amount.add_argument(
        "--duration",
        type=_argtype(_positive_float),
        metavar="SECONDS",
        help="send for this long (default: --messages 1000)",
    )
    parser.add_argument(
        "--concurrency",
        type=_argtype(_positive_int),
        default=10,
        metavar="N",
        help="parallel SMTP sessions, across all processes (default 10)",
    )
    parser.add_argument(
        "--procs",
        type=_argtype(_positive_int),
        default=1,
        metavar="N",
        help="generator processes; sessions, messages and rate are shared out (default 1)",
    )
    parser.add_argument(
        "--rate",
        type=_argtype(_positive_float),
        metavar="MSGS_PER_S",
        help="start at most this many messages per second in all (default: no limit)",
    )
    body = parser.add_mutually_exclusive_group()
    body.add_argument(
        "--size",
        type=_argtype(parse_size_mix),
        default=[(1024, 1.0)],
        metavar="SIZE[:WEIGHT],...",
        help="message size, or a weighted mix such as 1k:70,10k:25,100k:5 (default 1k)",
    )
    body.add_argument(
        "--template", metavar="FILE", help="send this .eml for every message (new Message-ID each)"
    )
    body.add_argument(
        "--eml-dir", metavar="DIR", help="replay the messages in DIR, round-robin, in name order"
    )
    parser.add_argument(
        "--rcpts",
        type=_argtype(_positive_int),
        default=1,
        metavar="N",
        help="recipients per message (default 1)",
    )
    parser.add_argument(
        "--per-conn",
        type=_argtype(_positive_int),
        metavar="N",
        help="messages per connection, then QUIT and reconnect (1: a connection per message; "
        "default: keep the connection)",
    )
    parser.add_argument(
        "--no-pipelining",
        dest="pipelining",
        action="store_false",
        help="wait for each reply before the next command, even if the server offers PIPELINING",
    )
    parser.add_argument("--starttls", action="store_true", help="STARTTLS after EHLO")
    parser.add_argument(
        "--tls-verify",
        action="store_true",
        help="verify the server's certificate and name (default: encrypt without verifying)",
    )
    parser.add_argument(
        "--auth", metavar="USER:PASS", help="AUTH PLAIN after EHLO (after TLS with --starttls)"
    )
    parser.add_argument(
        "--from",
        dest="sender",
        type=_argtype(check_address_template),
        default="bench@example.com",
        metavar="TEMPLATE",
        help="envelope sender; {n} is the message number (default bench@example.com)",
    )
    parser.add_argument(
        "--to",
        dest="recipient",
        type=_argtype(check_address_template),
        default="user{r}@example.net",
        metavar="TEMPLATE",
        help="recipients; {n} the message number, {r} the recipient index "
        "(default user{r}@example.net)",
    )
    parser.add_argument(
        "--helo", default="bench.tachymail.invalid", metavar="NAME", help="name sent in EHLO"
    )
    parser.add_argument(
        "--timeout",
        type=_argtype(_positive_float),
        default=60.0,
        metavar="SECONDS",
        help="give up on a reply or a connection after this long (default 60)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the size mix's choices"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def add_sink_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tachymail sink`` (the sink reads them in ``SinkConfig``)."""
    parser.add_argument("listen", metavar="HOST:PORT", help="where to listen")
    parser.add_argument(
        "--procs",
        type=_argtype(_positive_int),
        default=1,
        metavar="N",
        help="server processes sharing the port with SO_REUSEPORT (default 1)",
    )
    for where, text in (
        ("mail", "MAIL"),
        ("rcpt", "RCPT"),
        ("data", "the end of data"),
    ):
        parser.add_argument(
            f"--{where}-reply",
            action="append",
            type=_argtype(_checked_reply),
            metavar="CODE:PERCENT",
            help=f"answer {text} with CODE in PERCENT of cases, at random (repeatable)",
        )
    parser.add_argument(
        "--seed", type=int, default=None, metavar="N", help="seed of the reply mix's random choices"
    )
    parser.add_argument(
        "--latency",
        type=_argtype(_non_negative_float),
        default=0.0,
        metavar="MS",
        help="milliseconds added before the reply to the end of data",
    )
    parser.add_argument(
        "--command-latency",
        type=_argtype(_non_negative_float),
        default=0.0,
        metavar="MS",
        help="milliseconds added before the reply to every command",
    )
    parser.add_argument(
        "--max-connections",
        type=_argtype(_positive_int),
        metavar="N",
        help="concurrent connections; 421 4.7.0 beyond (default: no limit)",
    )
    parser.add_argument(
        "--max-size",
        type=_argtype(parse_size),
        default=35 * 1024 * 1024,
        metavar="SIZE",
        help="advertised SIZE; 552 5.3.4 beyond (default 35m)",
    )
    parser.add_argument(
        "--hostname", default="sink.tachymail.invalid", help="name in the greeting and EHLO"
    )
    parser.add_argument(
        "--store",
        metavar="DIR",
        help="write what is received into a tachymail queue in DIR/queue (group commit, "
        "synced before the 250), to measure storage alone",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve the counters as Prometheus metrics (tachymail_sink_*_total) here",
    )
    parser.add_argument(
        "--record",
        metavar="FILE",
        help="append one JSON line per connection, EHLO, refusal, accepted message and close "
        "to FILE (see docs/load-testing.md)",
    )
    parser.add_argument(
        "--reply-for",
        action="append",
        type=_argtype(_checked_scripted),
        metavar="ADDR[@STAGE]=REPLY",
        help="answer MAIL FROM (or STAGE: rcpt, data) with REPLY (4xx/5xx; a 421 closes) for "
        "clients connecting from ADDR, an IP address or network (repeatable; the first match "
        "per stage wins)",
    )
    parser.add_argument(
        "--greeting-for",
        action="append",
        type=_argtype(_checked_greeting),
        metavar="ADDR=REPLY",
        help="greet clients from ADDR with REPLY instead of 220 (a 421 closes; another 4xx/5xx "
        "answers 503 to everything until QUIT) (repeatable; the first match wins)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the counters on exit as one JSON object"
    )
