"""Log formats (human text, JSON lines or logfmt, ``[log] format``) and targets (stderr,
a file or syslog, ``[log] target``), and reading a message's story back from the lines.

Event lines (an SMTP session's outcome, each accepted message, each delivery attempt)
carry their fields in ``extra={"fields": {...}}``; the JSON and logfmt formats emit them
as keys (``event``, ``queue_id``, ``client``, ``result``, ...), so one ``queue_id``
traces a message from intake to delivery. The text format shows only the message, which
names the queue id too: ``ID queued: from <...> to <...>; ...; message-id <...>`` at
intake (event ``message_accepted``) and ``ID to <rcpt> via HOP: RESULT: REPLY`` for each
delivery attempt (event ``delivery_attempt``). :func:`story` reads all three formats.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging.handlers import SysLogHandler, WatchedFileHandler
from pathlib import Path
from typing import Any

from tachymail.config import LogConfig
from tachymail.net import split_hostport

FORMATS = ("text", "json", "logfmt")
TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def _base(record: logging.LogRecord) -> dict[str, Any]:
    created = record.created
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    out: dict[str, Any] = {
        "time": f"{stamp}.{int(created % 1 * 1000):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "pid": record.process,
        "msg": record.getMessage(),
    }
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        out.update(fields)
    if record.exc_info:
        out["exception"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, msg, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_base(record), ensure_ascii=False, default=str)


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """``key=value`` pairs, values quoted when they hold spaces, quotes or equals signs."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _base(record).items())


def formatter(kind: str) -> logging.Formatter:
    """The formatter for ``[log] format`` *kind* ("text", "json" or "logfmt")."""
    if kind == "json":
        return JsonFormatter()
    if kind == "logfmt":
        return LogfmtFormatter()
    return logging.Formatter(TEXT_FORMAT)


def use_format(kind: str) -> None:
    """Switch every handler of the root logger to *kind*."""
    chosen = formatter(kind)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(chosen)


class _SyslogFormatter(logging.Formatter):
    """``tachymail[PID]: `` before each line, as syslog(3) writes; syslog adds the time."""

    def __init__(self, inner: logging.Formatter, text: bool) -> None:
        super().__init__()
        self.inner, self.text = inner, text

    def format(self, record: logging.LogRecord) -> str:
        if self.text:  # the daemon's time and pid are syslog's business
            line = f"{record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_info:
                line += "\n" + self.formatException(record.exc_info)
        else:
            line = self.inner.format(record)
        return f"tachymail[{record.process}]: {line}"


def configure(settings: LogConfig, path: Path) -> str:
    """Send every line of the root logger to ``settings.target`` in ``settings.format``.

    *path* is the log file of target "file" (``Config.log_path``); its directory is made
    if missing. Returns where the lines go ("stderr", the file's path, or "syslog (SOCKET,
    facility F)"). Raises OSError, naming the file or socket, when it cannot be opened;
    nothing is changed then.
    """
    handler: logging.Handler
    chosen = formatter(settings.format)
    if settings.target == "file":
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # WatchedFileHandler reopens the file when logrotate has moved it away.
            handler = WatchedFileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise OSError(f"cannot open the log file {path}: {exc.strerror}") from exc
        where = str(path)
    elif settings.target == "syslog":
        socket_name = settings.syslog_socket
        address: str | tuple[str, int] = (
            socket_name if socket_name.startswith("/") else split_hostport(socket_name)
        )
        try:
            handler = SysLogHandler(address, facility=settings.syslog_facility)
        except OSError as exc:
            raise OSError(f"cannot open the syslog socket {socket_name}: {exc.strerror}") from exc
        chosen = _SyslogFormatter(chosen, settings.format == "text")
        where = f"syslog ({socket_name}, facility {settings.syslog_facility})"
    else:
        use_format(settings.format)
        return "stderr"
    handler.setFormatter(chosen)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    return where


# --- reading a message's story back (`tachymail log`) --------------------------------------

QUEUE_ID = re.compile(r"\b[0-9a-f]{20}\b")
_TEXT_INTAKE = re.compile(
    r"\b(?P<queue_id>[0-9a-f]{20}) queued: from <(?P<sender>[^>]*)> to (?P<rcpts>.*?); "
    r".*; message-id (?P<message_id>.*)$"
)
_TEXT_ATTEMPT = re.compile(
    r"\b(?P<queue_id>[0-9a-f]{20}) to <(?P<recipient>[^>]*)> via \S+: "
    r"(?P<result>delivered|bounced|deferred): (?P<reply>.*)$"
)
_LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def _logfmt_fields(line: str) -> dict[str, Any] | None:
    fields: dict[str, Any] = {}
    for key, raw in _LOGFMT_PAIR.findall(line):
        value: Any = raw
        if raw.startswith('"'):
            try:  # the writer's escapes (backslash, quote, \n) are JSON's
                value = json.loads(raw)
            except ValueError:
                value = raw[1:-1]
        elif raw.startswith("[") or raw in ("null", "true", "false") or raw.isdigit():
            with contextlib.suppress(ValueError):
                value = json.loads(raw)
        if isinstance(value, str) and value.startswith("["):
            # a list (queue_ids, recipients) was written as JSON, then quoted
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        fields[key] = value
    return fields if "msg" in fields and "level" in fields else None


def parse_line(line: str) -> dict[str, Any]:
    """The fields of one log line of any format (after any syslog prefix).

    JSON and logfmt lines give their keys; a text line gives ``msg`` (the whole line) and,
    for intake and delivery attempt lines, the event's fields read back from the message.
    """
    brace = line.find("{")
    if brace >= 0:
        try:
            found = json.loads(line[brace:])
        except ValueError:
            found = None
        if isinstance(found, dict) and "msg" in found:
            return found
    found = _logfmt_fields(line)
    if found is not None:
        return found
    fields: dict[str, Any] = {"msg": line}
    intake = _TEXT_INTAKE.search(line)
    if intake:
        fields.update(intake.groupdict(), event="message_accepted")
        fields["recipients"] = re.findall(r"<([^>]*)>", fields.pop("rcpts"))
    attempt = _TEXT_ATTEMPT.search(line)
    if attempt and not intake:
        fields.update(attempt.groupdict(), event="delivery_attempt")
    return fields


def _queue_ids(fields: dict[str, Any]) -> set[str]:
    found = set(QUEUE_ID.findall(str(fields.get("msg", ""))))
    if isinstance(fields.get("queue_id"), str):
        found.add(fields["queue_id"])
    if isinstance(fields.get("queue_ids"), list):
        found.update(str(q) for q in fields["queue_ids"])
    return found


def _bare(message_id: str) -> str:
    return message_id.strip().strip("<>").strip()


@dataclass
class Story:
    """What the log says about one queue id: its lines, intake, attempts per recipient."""

    queue_id: str
    lines: list[str] = field(default_factory=list)
    intake: dict[str, Any] | None = None
    #: recipient -> (result, reply) of each attempt, in log order
    attempts: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """Readable lines: the intake, each recipient's last result, the outcome."""
        out = [f"queue id {self.queue_id}:"]
        recipients = list(self.attempts)
        if self.intake is not None:
            recipients = [*self.intake.get("recipients", []), *recipients]
            recipients = list(dict.fromkeys(recipients))
            out[0] += (
                f" message-id {self.intake.get('message_id') or '(none)'},"
                f" from <{self.intake.get('sender', '')}>, {len(recipients)} recipient(s)"
            )
        else:
            out[0] += " (no intake line: received before this log begins)"
        pending = results = 0
        kinds = set()
        for rcpt in recipients:
            tries = self.attempts.get(rcpt, [])
            if not tries:
                out.append(f"  <{rcpt}>: no delivery attempt logged")
                pending += 1
                continue
            result, reply = tries[-1]
            count = f"{len(tries)} attempt{'s' if len(tries) > 1 else ''}"
            out.append(f"  <{rcpt}>: {result} after {count}: {reply}")
            results += 1
            kinds.add(result)
            pending += result == "deferred"
        if pending:
            out.append(f"outcome: still queued ({pending} recipient(s) pending)")
        elif kinds == {"delivered"}:
            out.append("outcome: delivered")
        elif kinds == {"bounced"}:
            out.append("outcome: bounced")
        elif results:
            out.append("outcome: partly delivered, partly bounced")
        return out


def story(lines: Iterable[str] | Callable[[], Iterable[str]], wanted: str) -> list[Story]:
    """The stories of *wanted*: a queue id, or a Message-ID (with or without <>) that the
    intake lines map to queue ids (one story per queue id, in log order). Empty when no
    line mentions it. *lines* may be a function returning a fresh iterator each call, so
    that large log files are streamed (a Message-ID needs two passes) instead of held."""
    if callable(lines):
        read = lines
    else:
        kept = lines if isinstance(lines, list) else list(lines)
        read = lambda: kept  # noqa: E731
    if QUEUE_ID.fullmatch(wanted):
        ids = [wanted]
    else:
        ids = []
        for line in read():
            if "message-id" not in line and "message_id" not in line:
                continue  # cheap skip: only intake lines carry it
            fields = parse_line(line)
            if fields.get("event") == "message_accepted" and _bare(
                str(fields.get("message_id") or "")
            ) == _bare(wanted):
                ids.append(str(fields["queue_id"]))
    stories = {queue_id: Story(queue_id) for queue_id in dict.fromkeys(ids)}
    for line in read():
        if not any(queue_id in line for queue_id in stories):
            continue
        fields = parse_line(line)
        for queue_id in _queue_ids(fields) & stories.keys():
            found = stories[queue_id]
            found.lines.append(line)
            if fields.get("queue_id") != queue_id:
                continue
            if fields.get("event") == "message_accepted":
                found.intake = fields
            elif fields.get("event") == "delivery_attempt":
                rcpt = str(fields.get("recipient", ""))
                found.attempts.setdefault(rcpt, []).append(
                    (str(fields.get("result", "")), str(fields.get("reply", "")))
                )
    return [s for s in stories.values() if s.lines]


def print_stories(stories: list[Story]) -> None:
    """Each story's lines as logged, then its summary."""
    for found in stories:
        for line in found.lines:
            sys.stdout.write(line + "\n")
        sys.stdout.write("\n" + "\n".join(found.summary()) + "\n")
