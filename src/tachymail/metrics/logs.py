"""Log formats: human text, JSON lines or logfmt, chosen by ``[log] format``.

Event lines (an SMTP session's outcome, each accepted message, each delivery attempt)
carry their fields in ``extra={"fields": {...}}``; the JSON and logfmt formats emit them
as keys (``event``, ``queue_id``, ``client``, ``result``, ...), so one ``queue_id``
traces a message from intake to delivery. The text format shows only the message.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

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
