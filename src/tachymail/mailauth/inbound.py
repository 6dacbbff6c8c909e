"""The inbound checks of one SMTP session, made into decisions (what intake calls).

A session on a listener whose mode (:meth:`InboundChecker.mode`) is not ``off``, from a
client that is neither authenticated nor trusted, calls:

1. :meth:`InboundChecker.connect` when the client connects: DNS block and allow lists.
   ``reply`` (554 5.7.1) is what an ``enforce`` listener sends instead of its greeting; an
   allow-listed client skips everything below.
2. :meth:`InboundChecker.iprev` (may run beside the greeting) and
   :meth:`InboundChecker.mail` at MAIL FROM: SPF of the MAIL FROM and HELO identities;
   ``reply`` (550 5.7.23) when ``spf_reject_fail`` is set and SPF says fail.
3. :meth:`InboundChecker.message` after DATA: DKIM and ARC (side by side), DMARC, the
   Authentication-Results field, forged fields removed, DMARC aggregate data, ARC sealing
   of relayed mail, and the action the policy asks for.

Nothing here raises for bad input or DNS trouble: a check that cannot complete gives its
``temperror`` (or ``permerror``) result, and an unexpected error inside a check is logged
and reported as ``temperror`` for that method, never as a rejection of the message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from tachymail.config import Config, ListenerConfig
from tachymail.mailauth.arc import NO_ARC_SETS, ArcResult, ArcSealer, may_have_arc_sets, verify_arc
from tachymail.mailauth.dkim import (
    DkimResult,
    HeaderBlock,
    KnownSigner,
    known_result,
    known_signer,
    plain_signature,
    read_header,
    verify_dkim,
    verify_dkim_now,
)
from tachymail.mailauth.dmarc import (
    DmarcResult,
    aligned,
    check_dmarc,
    check_dmarc_now,
    from_domain,
    policy_answers,
)
from tachymail.mailauth.dnsapi import DnsLookups, peek_cache
from tachymail.mailauth.dnsbl import Listing, dnsbl
from tachymail.mailauth.iprev import IprevResult, check_iprev
from tachymail.mailauth.results import (
    FIELD_NAME,
    FieldTemplate,
    field_template,
    remove_forged,
    render,
)
from tachymail.mailauth.spf import SpfResult, check_spf, check_spf_now
from tachymail.protocol.replies import reply

if TYPE_CHECKING:
    from tachymail.mailauth.reports import DmarcReports, ReportRow

__all__ = [
    "QUARANTINE_HEADER",
    "ConnectVerdict",
    "InboundChecker",
    "MailVerdict",
    "MessageVerdict",
]

log = logging.getLogger(__name__)

#: the field ``dmarc_quarantine = "header"`` adds to a message DMARC quarantines
QUARANTINE_HEADER = b"X-Tachymail-Quarantine: dmarc\r\n"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConnectVerdict:
    """The DNSBL/DNSWL outcome for a client address.

    ``reply``: ``554 5.7.1 Service unavailable; client [IP] blocked using ZONE[; TEXT]``
    when a block list lists the client and no allow list does, else None. ``allowlisted``:
    an allow list lists the client (the later checks are skipped). ``listings``: every
    list, block and allow, that lists the client.
    """

    reply: bytes | None
    allowlisted: bool
    listings: tuple[Listing, ...]


@dataclass(frozen=True, slots=True)
class MailVerdict:
    """SPF at MAIL FROM: the MAIL FROM and HELO results (None: SPF is off), and ``reply``
    (``550 5.7.23``) when ``spf_reject_fail`` is set and the MAIL FROM result is fail."""

    spf: SpfResult | None
    helo: SpfResult | None
    reply: bytes | None


# not frozen: one is made per message, and a frozen one costs three times as much to make
@dataclass(slots=True)
class MessageVerdict:
    """What to do with a message after DATA.

    ``action``: ``"accept"``, ``"reject"`` (send ``reply`` instead of 250 and keep
    nothing: ``550 5.7.1`` for a DMARC reject, ``451 4.4.3`` instead when SPF or a DKIM
    signature of a domain that could align failed temporarily: a retry may pass) or
    ``"quarantine"`` (queue it on hold). ``headers``: the fields to put on top of ``content`` (our
    Authentication-Results; the quarantine header and the ARC set when they apply), CRLF
    terminated. ``content``: the message without the Authentication-Results fields that
    claimed our authserv-id (the same object when there were none). ``results``: (method,
    result) pairs (methods spf, spf_helo, dkim, dmarc, arc, iprev) for the metrics;
    ``summary``: the same as one log-line fragment, ``"spf=pass dkim=pass dmarc=pass"``.
    ``dkim``, ``dmarc``, ``arc``: the results themselves (for details; empty / None for a
    method that did not run).
    """

    action: str
    reply: bytes | None
    headers: bytes
    content: bytes
    results: tuple[tuple[str, str], ...]
    summary: str
    dkim: tuple[DkimResult, ...] = ()
    dmarc: DmarcResult | None = None
    arc: ArcResult | None = None


#: verdicts of repeating senders kept (see InboundChecker._repeat); then it starts afresh
REPEATS_KEPT = 4096


@dataclass(slots=True)
class _Repeat:
    """What a sender's messages share once their results are known (see
    :meth:`InboundChecker._repeat`): everything of the verdict but the header.b words and
    the content, and the row their DMARC aggregate data goes to."""

    template: FieldTemplate
    tail: bytes  # after the Authentication-Results field: the quarantine header, or b""
    action: str
    reply: bytes | None
    results: tuple[tuple[str, str], ...]
    summary: str
    row: ReportRow | None


#: transactions whose lanes are kept (see InboundChecker._lane), and lanes per transaction;
#: then they start afresh
LANES_KEPT = 4096
LANES_PER_TRANSACTION = 16


@dataclass(slots=True)
class _Lane:
    """The messages of a transaction's sender signed by one plain DKIM signer, once one has
    passed (see :meth:`InboundChecker._lane`): the signer, the session's iprev result
    (compared by identity: a session keeps its own), the cached DMARC answers the verdict
    was decided on, and the verdict but for header.b."""

    signer: KnownSigner
    iprev: IprevResult | None
    answers: tuple[tuple[str, str, Any], ...]
    dmarc: DmarcResult | None
    repeat: _Repeat


@dataclass(slots=True)
class _Transaction:
    """The lanes of the transactions whose SPF results are *mail* (a session keeps its
    own object, for the transactions of one sender), made once one message passed."""

    mail: MailVerdict
    lanes: dict[tuple[Any, ...], _Lane]


#: the DKIM result shown for a message without a signature (RFC 8601 §2.7.1: dkim=none)
_UNSIGNED = (DkimResult("none", "", "", "", "", ""),)


def _dkim_key(result: DkimResult) -> tuple[str, ...]:
    """What a verdict takes from a DKIM result: all of it but b= (see _Repeat)."""
    return (
        result.result,
        result.domain,
        result.selector,
        result.algorithm,
        result.identity,
        result.detail,
    )


class InboundChecker:
    """The inbound checks of the configuration's ``[mailauth]`` section, on *dns*.

    One per worker process (it holds the DMARC aggregate store and the ARC key). With
    *record_reports* False no DMARC aggregate data is kept whatever the configuration says
    (`tachymail mailauth check` looks at a file; it received nothing). The ARC key is read
    here: ValueError naming the file when it is missing or unusable.
    """

    def __init__(self, config: Config, dns: DnsLookups, *, record_reports: bool = True) -> None:
        self.config = config
        self.settings = config.mailauth
        self.dns = dns
        #: the authserv-id of our Authentication-Results fields
        self.authserv_id = self.settings.authserv_id or config.server.hostname
        self.reports: DmarcReports | None = None
        #: see _repeat
        self._repeats: dict[tuple[Any, ...], _Repeat] = {}
        #: see _lane: by the id of the transactions' SPF results
        self._lanes: dict[int, _Transaction] = {}
        if record_reports and self.settings.dmarc and self.settings.dmarc_reports:
            from tachymail.mailauth.reports import DmarcReports  # lmdb: only when used

            self.reports = DmarcReports(config.data_path)
        self.sealer: ArcSealer | None = None
        if self.settings.arc_seal:
            self.sealer = ArcSealer(
                config.data_path,
                self.settings.arc_seal["domain"],
                self.settings.arc_seal["selector"],
            )

    def mode(self, role: str, listener: ListenerConfig | None = None) -> str:
        """``"enforce"``, ``"tag"`` or ``"off"``: the listener's ``mailauth`` setting when
        *listener* is given and sets one, else by *role* (enforce on mx, off elsewhere)."""
        if listener is not None:
            return listener.mailauth_mode
        return ListenerConfig(role=role).mailauth_mode

    def flush(self) -> None:
        """Write the buffered DMARC aggregate data now (at worker stop)."""
        if self.reports is not None:
            try:
                self.reports.flush()
            except Exception:
                log.exception("DMARC aggregate data could not be written")

    # -- connect -----------------------------------------------------------------------------

    async def connect(self, ip: str) -> ConnectVerdict:
        """Look *ip* up in the block and allow lists, all at once. A client on an allow list
        is not refused for a block list (the operator trusts the allow list more)."""
        block, allow = self.settings.dnsbl_zones, self.settings.dnswl_zones
        if not block and not allow:
            return ConnectVerdict(None, False, ())
        blocked, allowed = await asyncio.gather(
            self._guard("dnsbl", dnsbl(self.dns, ip, block), list[Listing]()),
            self._guard("dnswl", dnsbl(self.dns, ip, allow), list[Listing]()),
        )
        listings = (*blocked, *allowed)
        if allowed:
            log.info("client %s is on allow list %s", ip, allowed[0].zone)
            return ConnectVerdict(None, True, listings)
        if blocked:
            first = blocked[0]
            text = f"Service unavailable; client [{ip}] blocked using {first.zone}"
            if first.text:
                text += f"; {first.text}"
            log.info("client %s refused: listed on %s (%s)", ip, first.zone, ",".join(first.codes))
            return ConnectVerdict(reply(554, "5.7.1", text), False, listings)
        return ConnectVerdict(None, False, listings)

    # -- iprev, MAIL FROM ----------------------------------------------------------------------

    async def iprev(self, ip: str) -> IprevResult | None:
        """The iprev result of *ip*; None when ``iprev`` is off."""
        if not self.settings.iprev:
            return None
        fallback = IprevResult("temperror", "", "internal error", ip)
        return await self._guard("iprev", check_iprev(self.dns, ip), fallback)

    async def mail(self, ip: str, helo: str, mail_from: str) -> MailVerdict:
        """SPF of the MAIL FROM (*mail_from* without angle brackets, "" for the null sender)
        and HELO identities; with ``spf_reject_fail``, a fail gets
        ``550 5.7.23 <addr>: Sender address rejected: SPF check failed[: explanation]``."""
        if not self.settings.spf:
            return MailVerdict(None, None, None)
        sender = mail_from.strip().removeprefix("<").removesuffix(">")
        spf, helo_result = await self._guard(
            "spf",
            check_spf(self.dns, ip, sender, helo, receiver=self.authserv_id),
            _spf_error(sender, helo),
        )
        return self._mail_verdict(ip, sender, spf, helo_result)

    def mail_now(self, ip: str, helo: str, mail_from: str) -> MailVerdict | None:
        """What :meth:`mail` gives, without waiting, when the resolver's cache answers every
        SPF lookup (see :func:`~tachymail.mailauth.spf.check_spf_now`); None when a lookup
        would have to wait: then await :meth:`mail`."""
        if not self.settings.spf:
            return MailVerdict(None, None, None)
        sender = mail_from.strip().removeprefix("<").removesuffix(">")
        try:
            found = check_spf_now(self.dns, ip, sender, helo, receiver=self.authserv_id)
        except Exception:
            log.exception("mailauth spf check failed unexpectedly; reported as temperror")
            found = _spf_error(sender, helo)
        if found is None:
            return None
        return self._mail_verdict(ip, sender, *found)

    def _mail_verdict(
        self, ip: str, sender: str, spf: SpfResult, helo_result: SpfResult
    ) -> MailVerdict:
        answer = None
        if self.settings.spf_reject_fail and spf.result == "fail":
            text = f"<{sender}>: Sender address rejected: SPF check failed"
            why = _printable(spf.explanation) or (
                f"{spf.domain} does not designate {ip} as permitted sender"
            )
            answer = reply(550, "5.7.23", f"{text}: {why}")
        return MailVerdict(spf, helo_result, answer)

    # -- after DATA ----------------------------------------------------------------------------

    async def message(
        self,
        *,
        ip: str,
        helo: str,
        mail_from: str,
        mail: MailVerdict,
        iprev: IprevResult | None,
        content: bytes,
        mode: str,
        relay: bool,
        crlf: bool = False,
    ) -> MessageVerdict:
        """DKIM, ARC and DMARC of *content*, our Authentication-Results field, and the action.

        *mail* and *iprev* are what :meth:`mail` and :meth:`iprev` gave for this
        transaction. In mode ``"tag"`` the action is always accept (the header still tells
        the truth). DMARC fail with disposition reject gets, as ``dmarc_reject`` says, a
        reject (``550 5.7.1``), a quarantine or nothing; quarantine is ``"quarantine"``
        (hold) or, with ``dmarc_quarantine = "header"``, accept with
        ``X-Tachymail-Quarantine: dmarc``. With *relay* and ``arc_seal`` configured the
        ARC set is added too. *crlf*: *content* has CRLF line ends only (the SMTP session
        makes sure of it), which spares the DKIM check two passes over the body. Never
        raises.
        """
        settings = self.settings
        stripped, forged = remove_forged(content, self.authserv_id)
        if forged:
            log.info("removed %d forged Authentication-Results field(s) from %s", forged, ip)
        author = from_domain(content) if settings.dmarc else None
        seal = self.sealer is not None and relay
        # DKIM runs in this task; ARC (when the message has ARC fields, whose keys it looks
        # up) and the DMARC record's lookup (when not cached) run beside it in tasks of
        # their own. The common message needs no task: each one costs loop turns.
        beside: list[asyncio.Future[Any]] = []
        arc_work: asyncio.Future[ArcResult] | None = None
        arc: ArcResult | None = None
        if (settings.arc or seal) and may_have_arc_sets(content):
            arc_work = asyncio.ensure_future(
                self._guard(
                    "arc",
                    verify_arc(self.dns, content),
                    ArcResult("temperror", 0, "internal error"),
                )
            )
            beside.append(arc_work)
        elif settings.arc or seal:
            arc = NO_ARC_SETS
        # the DMARC record is wanted after DKIM: ask for it now so the answer is cached by then
        if author and not self._cached_txt(f"_dmarc.{author}"):
            beside.append(asyncio.ensure_future(self._prefetch(f"_dmarc.{author}")))
        try:
            dkim = (
                await self._guard("dkim", self._dkim(content, crlf), [_dkim_error()])
                if settings.dkim
                else list[DkimResult]()
            )
            if arc_work is not None:
                arc = await arc_work
            for task in beside:
                await task
        finally:
            for task in beside:  # cancelled (the client left): nothing left running
                task.cancel()
        dmarc: DmarcResult | None = None
        if settings.dmarc:
            dmarc = await self._guard(
                "dmarc", check_dmarc(self.dns, author, mail.spf, dkim), _dmarc_error(author)
            )
        return self._verdict(ip, mail_from, mail, iprev, stripped, dkim, dmarc, arc, mode, seal)

    def message_now(
        self,
        *,
        ip: str,
        helo: str,
        mail_from: str,
        mail: MailVerdict,
        iprev: IprevResult | None,
        content: bytes,
        mode: str,
        relay: bool,
        crlf: bool = False,
    ) -> MessageVerdict | None:
        """What :meth:`message` gives, computed without waiting, when the resolver's cache
        holds every record the checks need (the DKIM keys, the DMARC record), the message
        has no ARC set to verify and is small enough to check in the event loop; None
        otherwise: then await :meth:`message`. On a busy MX, where the big senders' records
        stay cached, this is the common case: no task, no loop turn, reading not paused.
        Never raises."""
        settings = self.settings
        seal = self.sealer is not None and relay
        # the header block read once for every check below (None: not plain, each check
        # reads the message its own way)
        block = read_header(content)
        if (settings.arc or seal) and may_have_arc_sets(content, block):
            return None  # ARC's key lookups and checks run in a task of their own
        if self._lanes and block is not None and not seal and settings.dkim:
            try:
                known = self._lane(block, content, crlf, ip, mail_from, mail, iprev, mode)
            except Exception:  # a bug: the full path below judges the message
                log.exception("mailauth lane failed unexpectedly; the full checks run")
                known = None
            if known is not None:
                return known
        author = from_domain(content, block) if settings.dmarc else None
        if author and not self._cached_txt(f"_dmarc.{author}"):
            return None  # before DKIM is worked out for nothing: message() asks the DNS
        dkim: list[DkimResult] = []
        if settings.dkim:
            verified = self._guard_now("dkim", self._dkim_now, _dkim_errors, content, crlf, block)
            if verified is None:
                return None
            dkim = verified
        dmarc: DmarcResult | None = None
        if settings.dmarc:
            dmarc = self._guard_now(
                "dmarc",
                check_dmarc_now,
                partial(_dmarc_error, author),
                self.dns,
                author,
                mail.spf,
                dkim,
            )
            if dmarc is None:
                return None  # the organizational domain's record is not cached
        stripped, forged = content, 0
        if block is None or FIELD_NAME in block.lower:
            stripped, forged = remove_forged(content, self.authserv_id)
        if forged:
            log.info("removed %d forged Authentication-Results field(s) from %s", forged, ip)
        arc = NO_ARC_SETS if settings.arc or seal else None
        verdict = self._verdict(ip, mail_from, mail, iprev, stripped, dkim, dmarc, arc, mode, seal)
        if block is not None and not seal and not forged and len(dkim) == 1:
            try:
                self._open_lane(block, author, ip, mail_from, mail, iprev, dkim, dmarc, arc, mode)
            except Exception:  # only a shortcut for the next messages: this one is judged
                log.exception("mailauth lane not opened")
        return verdict

    def _lane(
        self,
        block: HeaderBlock,
        content: bytes,
        crlf: bool,
        ip: str,
        mail_from: str,
        mail: MailVerdict,
        iprev: IprevResult | None,
        mode: str,
    ) -> MessageVerdict | None:
        """The verdict of a message by a session's sender whose signer's earlier message
        passed (:meth:`_open_lane`), made without working its results out again: the
        same as :meth:`message_now` gives it, when its one DKIM signature, plain, passes
        with the key that one did, the DMARC answers are still the cached ones, and no
        field claims to be our Authentication-Results. None otherwise (the full path
        then judges). What it spares is reading the record and the policy, DMARC's
        decision and the verdict's lookup; the signature is verified, every time."""
        held = self._lanes.get(id(mail))
        if held is None or held.mail is not mail or FIELD_NAME in block.lower:
            return None
        peek = peek_cache(self.dns)
        signature = plain_signature(block, time.time())
        if peek is None or signature is None:
            return None
        author = from_domain(content, block) if self.settings.dmarc else None
        lane = held.lanes.get((signature.static, author, id(iprev), mode, ip, mail_from))
        if lane is None or lane.iprev is not iprev:
            return None
        for _domain, name, answer in lane.answers:
            if peek("TXT", name) is not answer:
                return None  # a DMARC answer expired or changed: decided again
        passed = known_result(lane.signer, signature, block, content, crlf, peek)
        if passed is None:
            return None
        dkim = [passed]  # signed: the field shows it (no dkim=none), and no ARC set: none
        repeat = lane.repeat
        return self._from_repeat(
            repeat, ip, mail_from, mail, content, dkim, dkim, lane.dmarc, NO_ARC_SETS, False
        )

    def _open_lane(
        self,
        block: HeaderBlock,
        author: str | None,
        ip: str,
        mail_from: str,
        mail: MailVerdict,
        iprev: IprevResult | None,
        dkim: list[DkimResult],
        dmarc: DmarcResult | None,
        arc: ArcResult | None,
        mode: str,
    ) -> None:
        """After :meth:`message_now` judged a message whose one DKIM signature is plain and
        passed, and whose DMARC result does not hang on chance (a fail may, through pct=)
        or on a DNS failure, and not the transaction's first such message: keep what
        :meth:`_lane` needs to judge the sender's next messages signed so."""
        if dkim[0].result != "pass" or (dmarc is not None and dmarc.result not in ("pass", "none")):
            return
        held = self._lanes.get(id(mail))
        if held is None or held.mail is not mail:
            # the transaction's first pass: a lane pays from the sender's second message,
            # and many sessions bring one
            if len(self._lanes) >= LANES_KEPT:
                self._lanes.clear()
            self._lanes[id(mail)] = _Transaction(mail, {})
            return
        peek = peek_cache(self.dns)
        signature = plain_signature(block, time.time())
        if peek is None or signature is None:
            return
        signer = known_signer(signature, peek)
        answers: tuple[tuple[str, str, Any], ...] | None = ()
        if self.settings.dmarc:
            answers = policy_answers(self.dns, author) if author else None
        if signer is None or answers is None:
            return
        shown = dkim  # signed: the field shows the signature
        repeat = self._repeat(ip, mail_from, mail, iprev, dkim, shown, dmarc, arc, mode)
        if len(held.lanes) >= LANES_PER_TRANSACTION:
            held.lanes.clear()
        key = (signer.static, author, id(iprev), mode, ip, mail_from)
        held.lanes[key] = _Lane(signer, iprev, answers, dmarc, repeat)

    def _repeat(
        self,
        ip: str,
        mail_from: str,
        mail: MailVerdict,
        iprev: IprevResult | None,
        dkim: list[DkimResult],
        shown_dkim: Sequence[DkimResult],
        dmarc: DmarcResult | None,
        arc: ArcResult | None,
        mode: str,
    ) -> _Repeat:
        """The verdict of a message (ARC unsealed) without its header.b words and content
        (*shown_dkim*: the DKIM results the field shows, dkim=none for none). It is made of
        the results (DKIM's but for b=), the client's address, the MAIL FROM address and
        the mode, and of nothing else, and one sender's messages repeat those: so it is
        made once, and kept under them (the result objects recur too: a session keeps its
        SPF and iprev results, :mod:`dmarc` shares its results, so the lookup mostly
        compares them by identity)."""
        key = (mail, iprev, dmarc, arc, tuple(map(_dkim_key, dkim)), mode, ip, mail_from)
        found = self._repeats.get(key)
        if found is not None:
            return found
        settings = self.settings
        shown_arc = arc if settings.arc else None
        action, answer, quarantine_header = self._policy(dmarc, mail.spf, dkim, mode)
        results = _results(mail, shown_dkim, dmarc, shown_arc, iprev)
        row = None
        if self.reports is not None and dmarc is not None:
            try:
                row = self.reports.row(dmarc, ip, mail_from, mail.spf, dkim, self.reports.today())
            except Exception:  # report data, not mail: never a reason to refuse the message
                log.exception("DMARC aggregate data not recorded")
        made = _Repeat(
            field_template(
                self.authserv_id,
                mail.spf,
                mail.helo,
                shown_dkim,
                dmarc,
                shown_arc,
                iprev,
                remote_ip=ip,
            ),
            QUARANTINE_HEADER if quarantine_header else b"",
            action,
            answer,
            results,
            _summary_text(results),
            row,
        )
        if len(self._repeats) >= REPEATS_KEPT:
            self._repeats.clear()
        self._repeats[key] = made
        return made

    def _count(
        self,
        repeat: _Repeat,
        dmarc: DmarcResult | None,
        ip: str,
        mail_from: str,
        spf: SpfResult | None,
        dkim: Sequence[DkimResult],
    ) -> None:
        """Count the message in its DMARC aggregate row: the one kept in *repeat*, made
        anew when the UTC day has changed since."""
        assert self.reports is not None and dmarc is not None
        try:
            row: ReportRow | None = repeat.row
            today = self.reports.today()
            if row is not None and row.day != today:
                row = repeat.row = self.reports.row(dmarc, ip, mail_from, spf, dkim, today)
            if row is not None:
                self.reports.count(row)
        except Exception:  # report data, not mail: never a reason to refuse the message
            log.exception("DMARC aggregate data not recorded")

    def _verdict(
        self,
        ip: str,
        mail_from: str,
        mail: MailVerdict,
        iprev: IprevResult | None,
        stripped: bytes,
        dkim: list[DkimResult],
        dmarc: DmarcResult | None,
        arc: ArcResult | None,
        mode: str,
        seal: bool,
    ) -> MessageVerdict:
        """The verdict from the results: our Authentication-Results field (and ARC set),
        the action, and what the log and the metrics say; the message counted in its
        DMARC aggregate row."""
        settings = self.settings
        # RFC 8601 §2.7.1: dkim=none says the message was not signed
        shown_dkim = (dkim or _UNSIGNED) if settings.dkim else dkim
        repeat = self._repeat(ip, mail_from, mail, iprev, dkim, shown_dkim, dmarc, arc, mode)
        return self._from_repeat(
            repeat, ip, mail_from, mail, stripped, dkim, shown_dkim, dmarc, arc, seal
        )

    def _from_repeat(
        self,
        repeat: _Repeat,
        ip: str,
        mail_from: str,
        mail: MailVerdict,
        stripped: bytes,
        dkim: list[DkimResult],
        shown_dkim: Sequence[DkimResult],
        dmarc: DmarcResult | None,
        arc: ArcResult | None,
        seal: bool,
    ) -> MessageVerdict:
        """A message's verdict from what its sender's messages share (*repeat*): counted
        in its DMARC aggregate row, our field with its own header.b words, the ARC set
        when *seal*."""
        settings = self.settings
        if repeat.row is not None:
            self._count(repeat, dmarc, ip, mail_from, mail.spf, dkim)
        headers = render(repeat.template, shown_dkim)
        headers += repeat.tail
        if seal and arc is not None and repeat.action != "reject":
            headers = self._seal(headers, stripped, arc) + headers
        return MessageVerdict(
            repeat.action,
            repeat.reply,
            headers,
            stripped,
            repeat.results,
            repeat.summary,
            tuple(dkim),
            dmarc,
            arc if settings.arc else None,
        )

    def _dkim_now(
        self, content: bytes, crlf: bool, block: HeaderBlock | None
    ) -> list[DkimResult] | None:
        return verify_dkim_now(
            self.dns,
            content,
            max_signatures=self.settings.dkim_max_signatures,
            crlf=crlf,
            block=block,
        )

    async def _dkim(self, content: bytes, crlf: bool) -> list[DkimResult]:
        return await verify_dkim(
            self.dns, content, max_signatures=self.settings.dkim_max_signatures, crlf=crlf
        )

    def _cached_txt(self, name: str) -> bool:
        """Whether the lookups' cache (``Resolver.cached``, when they have one) holds the
        TXT records of *name* (a hit counts as a lookup, as the prefetch would)."""
        peek = peek_cache(self.dns)
        return peek is not None and peek("TXT", name) is not None

    async def _prefetch(self, name: str) -> None:
        try:
            await self.dns.txt(name)
        except Exception:  # only a cache warm-up: check_dmarc asks again and judges
            log.debug("prefetch of %s failed", name, exc_info=True)

    def _policy(
        self,
        dmarc: DmarcResult | None,
        spf: SpfResult | None,
        dkim: Sequence[DkimResult],
        mode: str,
    ) -> tuple[str, bytes | None, bool]:
        """(action, reply, add the quarantine header) for the DMARC result."""
        if mode != "enforce" or dmarc is None or dmarc.result != "fail":
            return "accept", None, False
        disposition = dmarc.disposition
        if disposition == "reject":
            disposition = self.settings.dmarc_reject
        if disposition == "reject":
            author = dmarc.from_domain
            temporary = (
                spf is not None and spf.result == "temperror" and aligned(spf.domain, author, "r")
            ) or any(
                d.result == "temperror" and (not d.domain or aligned(d.domain, author, "r"))
                for d in dkim
            )
            if temporary:
                # an aligned SPF or DKIM pass may be hidden behind the DNS failure: the
                # sender retries, rather than the message being refused for good
                text = (
                    f"Temporary DNS failure checking DMARC of {dmarc.from_domain}; try again later"
                )
                return "reject", reply(451, "4.4.3", text), False
            text = (
                f"Message rejected: DMARC policy of {dmarc.from_domain} says reject "
                "(SPF and DKIM not aligned)"
            )
            return "reject", reply(550, "5.7.1", text), False
        if disposition == "quarantine":
            if self.settings.dmarc_quarantine == "header":
                return "accept", None, True
            return "quarantine", None, False
        return "accept", None, False

    def _seal(self, headers: bytes, content: bytes, arc: ArcResult) -> bytes:
        """The ARC set for the message as it leaves (our fields on top); b"" when the chain
        cannot be sealed now (a key lookup failed: sealing "fail" would break it for good)."""
        assert self.sealer is not None
        if arc.result not in ("none", "pass", "fail"):
            log.warning("ARC chain not sealed: its validation gave %s (%s)", arc.result, arc.detail)
            return b""
        value = _field_value(headers)
        try:
            return self.sealer.seal(headers + content, self.authserv_id, value, arc.result)
        except Exception:
            log.exception("ARC sealing failed; the message goes on without a new ARC set")
            return b""

    def _guard_now(
        self, method: str, work: Callable[..., T | None], fallback: Callable[[], T], *args: Any
    ) -> T | None:
        """*work(*args)*, as :meth:`_guard` for a check that does not wait; *fallback* makes
        the temperror (made only then: this runs for every message)."""
        try:
            return work(*args)
        except Exception:
            log.exception("mailauth %s check failed unexpectedly; reported as temperror", method)
            return fallback()

    async def _guard(self, method: str, work: Awaitable[T], fallback: T) -> T:
        """*work*'s result; *fallback* (a temperror) and a log line if it raises."""
        try:
            return await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("mailauth %s check failed unexpectedly; reported as temperror", method)
            return fallback


async def _value(value: T) -> T:
    return value


def _spf_error(sender: str, helo: str) -> tuple[SpfResult, SpfResult]:
    """The SPF results of a check that failed unexpectedly (a bug, logged)."""
    domain = sender.rpartition("@")[2] if sender else helo
    return (
        SpfResult("temperror", "mailfrom", domain, sender, detail="internal error"),
        SpfResult("temperror", "helo", helo, f"postmaster@{helo}", detail="internal error"),
    )


def _dmarc_error(author: str | None) -> DmarcResult:
    return DmarcResult(
        "temperror", author or "", "none", "none", False, False, detail="internal error"
    )


def _dkim_error() -> DkimResult:
    return DkimResult("temperror", "", "", "", "", "", "internal error")


def _dkim_errors() -> list[DkimResult]:
    return [_dkim_error()]


def _field_value(headers: bytes) -> bytes:
    """The value of the first field of *headers* (our Authentication-Results), unfolded."""
    first, *rest = headers.split(b"\r\n")
    lines = [first.partition(b":")[2].strip()]
    for line in rest:
        if line[:1] not in (b" ", b"\t"):
            break
        lines.append(line.strip())
    return b" ".join(lines)


def _printable(text: str) -> str:
    """*text* fit for an SMTP reply line: printable ASCII, one line, not too long."""
    clean = " ".join("".join(ch if " " <= ch <= "~" else " " for ch in text).split())
    return clean[:200]


def _results(
    mail: MailVerdict,
    dkim: Sequence[DkimResult],
    dmarc: DmarcResult | None,
    arc: ArcResult | None,
    iprev: IprevResult | None,
) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    if mail.spf is not None:
        pairs.append(("spf", mail.spf.result))
    if mail.helo is not None:
        pairs.append(("spf_helo", mail.helo.result))
    pairs += [("dkim", d.result) for d in dkim]
    if dmarc is not None:
        pairs.append(("dmarc", dmarc.result))
    if arc is not None:
        pairs.append(("arc", arc.result))
    if iprev is not None:
        pairs.append(("iprev", iprev.result))
    return tuple(pairs)


@functools.lru_cache(maxsize=1024)
def _summary_text(results: tuple[tuple[str, str], ...]) -> str:
    """:func:`_summary` as one log-line fragment; cached, as one sender's messages give the
    same results over and over."""
    return " ".join(_summary(results))


def _summary(results: Sequence[tuple[str, str]]) -> list[str]:
    """``method=result`` words in order; several results of a method (dkim) joined:
    ``dkim=pass,fail``."""
    words: dict[str, list[str]] = {}
    for method, result in results:
        words.setdefault(method, []).append(result)
    return [f"{method}={','.join(values)}" for method, values in words.items()]
