"""DMARC aggregate report data (RFC 7489 §7.2) and the aggregate report XML (Appendix C).

:class:`DmarcReports` counts the messages a domain's DMARC policy was evaluated on, grouped
by UTC day, source IP, disposition and results, in an LMDB side store at ``data_dir/dmarc``
that every worker process of the node shares. Counting is cheap: :meth:`DmarcReports.add`
only bumps a counter in memory; the buffer goes to the store at most every
``flush_interval`` seconds (one short, unsynced write transaction that adds to the stored
counts, so several processes never lose each other's counts). A crash loses at most the
buffer: report data, never mail. :meth:`DmarcReports.report` renders the XML that
``tachymail dmarc report`` prints.

Only messages whose From domain publishes a DMARC record are counted (results pass and
fail): the report goes to that record's owner, the ``record_domain`` (usually the
organizational domain), and ``report(domain=...)`` selects by it. Days older than
``keep_days`` are dropped when the buffer is flushed (at most once an hour).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import lmdb

from tachymail.lmdbenv import open_side_store

if TYPE_CHECKING:
    from tachymail.mailauth.dkim import DkimResult
    from tachymail.mailauth.dmarc import DmarcRecord, DmarcResult
    from tachymail.mailauth.spf import SpfResult

log = logging.getLogger(__name__)

DAY = 86400
_COUNT = struct.Struct(">Q")
_ROWS = b"R\0"  # R\0 domain \0 day(8 digits) \0 row JSON -> count
_POLICY = b"P\0"  # P\0 domain \0 day(8 digits) -> published policy JSON
_PRUNE_EVERY = 3600.0
_KEYS_KEPT = 4096  # rows whose store keys add() remembers (then it starts afresh)
_ENVIRONMENTS: dict[tuple[str, int], lmdb.Environment] = {}
_ENVIRONMENTS_LOCK = threading.Lock()
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# The XML result vocabularies (RFC 7489 Appendix C DKIMResultType, SPFResultType)
_DKIM_RESULTS = frozenset({"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"})
_SPF_RESULTS = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"})


class ReportRow(NamedTuple):
    """A row of a day's aggregate data (:meth:`DmarcReports.row`): the UTC day, the row's
    store key, and the key and value of the policy the domain published that day."""

    day: int
    key: bytes
    policy_key: bytes
    policy: bytes


class DmarcReports:
    """Aggregate DMARC data of this node (see the module docstring).

    One instance per process; the store is opened on first use (so an instance made before
    the workers fork is safe) and reopened in a child process. Not thread-safe beyond
    :meth:`add` and :meth:`flush` being callable from any one thread at a time.
    """

    def __init__(self, data_dir: Path, *, flush_interval: float = 5.0, keep_days: int = 31) -> None:
        self.directory = Path(data_dir) / "dmarc"
        self.flush_interval = flush_interval
        self.keep_days = keep_days
        self._buffer: Counter[bytes] = Counter()
        self._policies: dict[bytes, bytes] = {}
        self._keys: dict[tuple[Any, ...], tuple[bytes, bytes, bytes]] = {}
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._last_prune = 0.0
        self._env: lmdb.Environment | None = None
        self._env_pid = 0

    # ------------------------------------------------------------------ counting

    def add(
        self,
        result: DmarcResult,
        source_ip: str,
        envelope_from: str,
        spf: SpfResult | None,
        dkim: Sequence[DkimResult],
        *,
        when: float | None = None,
    ) -> None:
        """Count one message: *result* from ``check_dmarc``, the client's address, the
        MAIL FROM address ("" or "<>" for the null sender), the SPF result of the MAIL FROM
        identity (None: not checked) and the DKIM results. Results without a DMARC record
        (none, temperror, or permerror without a parsed record) are not counted. Flushes
        to the store when the last flush is ``flush_interval`` seconds old."""
        moment = time.time() if when is None else when
        row = self.row(result, source_ip, envelope_from, spf, dkim, int(moment // DAY))
        if row is not None:
            self.count(row)

    def row(
        self,
        result: DmarcResult,
        source_ip: str,
        envelope_from: str,
        spf: SpfResult | None,
        dkim: Sequence[DkimResult],
        day: int,
    ) -> ReportRow | None:
        """Where :meth:`add` counts a message of UTC day *day* (days since the epoch): its
        row, or None when it is not counted. One sender's messages fall into one row, so
        the inbound checks keep it and :meth:`count` each message of the day in it."""
        record = result.record
        if record is None or not result.record_domain or result.result not in ("pass", "fail"):
            return None
        address = envelope_from.strip().strip("<>")
        envelope = address.rpartition("@")[2].lower() if "@" in address else ""
        if not envelope and spf is not None:
            envelope = spf.domain.lower()  # null sender: the HELO identity SPF checked
        sampled_out = result.result == "fail" and result.disposition != result.policy
        auth_dkim = tuple(
            (d.domain.lower(), d.selector, d.result if d.result in _DKIM_RESULTS else "none")
            for d in dkim
        )
        auth_spf = (
            (
                spf.domain.lower(),
                "helo" if spf.identity == "helo" else "mfrom",
                spf.result if spf.result in _SPF_RESULTS else "none",
            )
            if spf is not None
            else None
        )
        # the same row again (the usual case: one sender, one client) reuses its keys
        memo = (
            result.record_domain,
            day,
            source_ip,
            result.disposition,
            result.dkim_aligned,
            result.spf_aligned,
            sampled_out,
            result.from_domain,
            envelope,
            auth_dkim,
            auth_spf,
            record,
        )
        keys = self._keys.get(memo)
        if keys is None:
            keys = self._row_keys(
                result, record, day, source_ip, envelope, sampled_out, auth_dkim, auth_spf
            )
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.clear()
            self._keys[memo] = keys
        return ReportRow(day, *keys)

    @staticmethod
    def today() -> int:
        """The UTC day now, in days since the epoch, as :meth:`row` takes it."""
        return int(time.time() // DAY)

    def count(self, row: ReportRow) -> None:
        """Count one message in *row* (:meth:`row`); flushes to the store when the last
        flush is ``flush_interval`` seconds old."""
        with self._lock:
            self._buffer[row.key] += 1
            self._policies[row.policy_key] = row.policy
            due = time.monotonic() - self._last_flush >= self.flush_interval
        if due:
            self.flush()

    def _row_keys(
        self,
        result: DmarcResult,
        record: DmarcRecord,
        day: int,
        source_ip: str,
        envelope: str,
        sampled_out: bool,
        auth_dkim: tuple[tuple[str, str, str], ...],
        auth_spf: tuple[str, str, str] | None,
    ) -> tuple[bytes, bytes, bytes]:
        """The store keys of a row and its day's policy, and the policy's value."""
        reasons = []
        if sampled_out:
            reasons.append("sampled_out")  # pct= lowered the policy (RFC 7489 §6.6.4)
        row = {
            "ip": source_ip,
            "disposition": result.disposition,
            "dkim": "pass" if result.dkim_aligned else "fail",
            "spf": "pass" if result.spf_aligned else "fail",
            "reasons": reasons,
            "header_from": result.from_domain,
            "envelope_from": envelope,
            "auth_dkim": [list(d) for d in auth_dkim],
            "auth_spf": [list(auth_spf)] if auth_spf is not None else [],
        }
        domain = result.record_domain.lower().encode()
        day_key = b"%s\0%08d" % (domain, day)
        key = _ROWS + day_key + b"\0" + json.dumps(row, sort_keys=True).encode()
        policy = {
            "p": record.p,
            "sp": record.sp or record.p,
            "adkim": record.adkim,
            "aspf": record.aspf,
            "pct": record.pct,
            "fo": record.fo,
        }
        return key, _POLICY + day_key, json.dumps(policy, sort_keys=True).encode()

    def flush(self) -> None:
        """Add the buffered counts to the store now (one unsynced write transaction). A
        store that cannot take them (full, unwritable) loses them, with a log line."""
        with self._lock:
            buffer, self._buffer = self._buffer, Counter()
            policies, self._policies = self._policies, {}
            self._last_flush = time.monotonic()
        if not buffer:
            return
        try:
            env = self._open()
            with env.begin(write=True) as txn:
                for key, count in buffer.items():
                    old = txn.get(key)
                    total = count + (_COUNT.unpack(old)[0] if old is not None else 0)
                    txn.put(key, _COUNT.pack(total))
                for key, value in policies.items():
                    txn.put(key, value)
        except (lmdb.Error, OSError) as exc:
            log.warning(
                "DMARC report data of %d rows lost: %s cannot take it (%s)",
                len(buffer),
                self.directory,
                exc,
            )
            return
        if time.monotonic() - self._last_prune >= _PRUNE_EVERY:
            self._last_prune = time.monotonic()
            self.prune(time.time() - self.keep_days * DAY)

    def prune(self, before: float, batch: int = 1000) -> int:
        """Drop the data of the UTC days that ended before *before*; how many records went.
        At most *batch* records are visited per write transaction (the store has one writer
        for the whole node, and a worker's event loop may be waiting for it)."""
        cutoff = int(before // DAY)
        removed = 0
        after = b""
        try:
            env = self._open()
            while True:
                with env.begin(write=True) as txn:
                    cursor = txn.cursor()
                    more = cursor.set_range(after) if after else cursor.first()
                    seen = 0
                    while more and seen < batch:
                        seen += 1
                        day = _day_of(bytes(cursor.key()))
                        if day is not None and day + 1 <= cutoff:
                            more = cursor.delete()  # moves to the next record
                            removed += 1
                        else:
                            more = cursor.next()
                    if not more:
                        return removed
                    after = bytes(cursor.key())
        except (lmdb.Error, OSError) as exc:
            log.warning("could not prune DMARC report data in %s: %s", self.directory, exc)
        return removed

    def close(self) -> None:
        """Flush; the store stays open for the other instances of this process."""
        self.flush()

    def _exists(self) -> bool:
        """Whether there is a store to read (reading never creates one)."""
        return self._env is not None or (self.directory / "data.mdb").exists()

    def _open(self) -> lmdb.Environment:
        if self._env is None or self._env_pid != os.getpid():
            self._env = _environment(self.directory)
            self._env_pid = os.getpid()
        return self._env

    # ------------------------------------------------------------------ reporting

    def rows(self, domain: str, since: float, until: float) -> tuple[dict[str, Any], ...]:
        """The stored rows of *domain* for the UTC days that overlap [since, until), counts
        summed over the days; each row is a dict with ``count`` added. Unflushed counts of
        this instance are flushed first."""
        self.flush()
        if not self._exists():
            return ()
        totals: Counter[bytes] = Counter()
        for row, value in self._days_of(_ROWS, domain, since, until):
            totals[row] += _COUNT.unpack(value)[0]
        rows = []
        for row, count in sorted(totals.items()):
            fields = json.loads(row)
            fields["count"] = count
            rows.append(fields)
        return tuple(rows)

    def published(self, domain: str, since: float, until: float) -> dict[str, Any] | None:
        """The policy *domain* published, as last seen in [since, until); None if unseen."""
        if not self._exists():
            return None
        found: dict[str, Any] | None = None
        for _rest, value in self._days_of(_POLICY, domain, since, until):
            found = json.loads(value)  # keys in day order: the last one seen wins
        return found

    def _days_of(
        self, kind: bytes, domain: str, since: float, until: float
    ) -> Iterator[tuple[bytes, bytes]]:
        """(the rest of the key after its day, value) of the *kind* records of *domain*
        kept for the UTC days in [since, until), in key order (day by day)."""
        first, last = _days(since, until)
        prefix = kind + domain.lower().encode() + b"\0"
        with self._open().begin() as txn:
            cursor = txn.cursor()
            more = cursor.set_range(prefix)
            while more:
                key = bytes(cursor.key())
                if not key.startswith(prefix):
                    break
                day_text, _, rest = key[len(prefix) :].partition(b"\0")
                if day_text.isdigit() and first <= int(day_text) < last:
                    yield rest, bytes(cursor.value())
                more = cursor.next()

    def report(
        self,
        domain: str,
        since: float,
        until: float,
        *,
        reporter: str,
        email: str,
        report_id: str | None = None,
    ) -> bytes:
        """The aggregate report of *domain* (RFC 7489 Appendix C) as UTF-8 XML with its
        declaration. Data is kept per UTC day: the report covers the whole days that
        overlap [since, until), and ``date_range`` says so (begin: the first day's start,
        end: the last day's end, epoch seconds). *reporter* is the ``org_name``, *email*
        the contact; *report_id* defaults to ``<reporter>.<domain>.<begin>.<end>``. A domain
        without data gets a report with its metadata and no ``record``."""
        first, last = _days(since, until)
        begin, end = first * DAY, last * DAY
        rows = self.rows(domain, since, until)
        policy = self.published(domain, since, until) or {}
        root = ET.Element("feedback")
        _text(root, "version", "1.0")
        meta = ET.SubElement(root, "report_metadata")
        _text(meta, "org_name", reporter)
        _text(meta, "email", email)
        _text(meta, "report_id", report_id or f"{reporter}.{domain.lower()}.{begin}.{end}")
        dates = ET.SubElement(meta, "date_range")
        _text(dates, "begin", str(begin))
        _text(dates, "end", str(end))
        published = ET.SubElement(root, "policy_published")
        _text(published, "domain", domain.lower())
        _text(published, "adkim", policy.get("adkim", "r"))
        _text(published, "aspf", policy.get("aspf", "r"))
        _text(published, "p", policy.get("p", "none"))
        _text(published, "sp", policy.get("sp", policy.get("p", "none")))
        _text(published, "pct", str(policy.get("pct", 100)))
        _text(published, "fo", policy.get("fo", "0"))
        for row in rows:
            record = ET.SubElement(root, "record")
            line = ET.SubElement(record, "row")
            _text(line, "source_ip", row["ip"])
            _text(line, "count", str(row["count"]))
            evaluated = ET.SubElement(line, "policy_evaluated")
            _text(evaluated, "disposition", row["disposition"])
            _text(evaluated, "dkim", row["dkim"])
            _text(evaluated, "spf", row["spf"])
            for reason in row["reasons"]:
                _text(ET.SubElement(evaluated, "reason"), "type", reason)
            identifiers = ET.SubElement(record, "identifiers")
            _text(identifiers, "envelope_from", row["envelope_from"])
            _text(identifiers, "header_from", row["header_from"])
            results = ET.SubElement(record, "auth_results")
            for d_domain, selector, d_result in row["auth_dkim"]:
                dkim = ET.SubElement(results, "dkim")
                _text(dkim, "domain", d_domain)
                if selector:
                    _text(dkim, "selector", selector)
                _text(dkim, "result", d_result)
            spf_rows = row["auth_spf"] or [[row["envelope_from"], "mfrom", "none"]]
            for s_domain, scope, s_result in spf_rows:  # at least one spf (the schema's 1..n)
                spf = ET.SubElement(results, "spf")
                _text(spf, "domain", s_domain)
                _text(spf, "scope", scope)
                _text(spf, "result", s_result)
        ET.indent(root)
        xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        return xml + b"\n"


def _environment(directory: Path) -> lmdb.Environment:
    """The process's one environment of *directory* (LMDB refuses a second open in one
    process, and one must not cross fork(): a child opens its own)."""
    key = (str(directory.resolve()), os.getpid())
    with _ENVIRONMENTS_LOCK:
        env = _ENVIRONMENTS.get(key)
        if env is None:
            env = _ENVIRONMENTS[key] = open_side_store(directory)
        return env


def _text(parent: ET.Element, tag: str, text: str) -> ET.Element:
    element = ET.SubElement(parent, tag)
    # characters XML 1.0 cannot carry (controls from a hostile header) would break the file
    element.text = _NOT_XML.sub("\ufffd", text)
    return element


def _days(since: float, until: float) -> tuple[int, int]:
    """The UTC day numbers [first, last) that overlap [since, until) (at least one day)."""
    first = int(since // DAY)
    last = max(-(-int(until) // DAY), first + 1)
    return first, last


def _day_of(key: bytes) -> int | None:
    """The day number in a store key, None for a key of another shape."""
    parts = key.split(b"\0", 3)
    if len(parts) < 3 or not parts[2].isdigit():
        return None
    return int(parts[2])
