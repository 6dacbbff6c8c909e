"""``tachymail dmarc report``: print a domain's DMARC aggregate report (RFC 7489 §7.2).

Reads the aggregate data the mx listeners keep in data_dir/dmarc (``[mailauth]
dmarc_reports``); safe beside a running server (counts a worker has not flushed yet, at
most a few seconds' worth, are not in it). Exit status 0 with the XML on stdout, 2 with one
line on stderr for a bad argument or configuration.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from typing import Any

from tachymail.cli.commands import _config, _fail
from tachymail.config import ConfigError


def add_dmarc_parser(sub: Any) -> None:
    """Register ``tachymail dmarc ...`` on the top-level subparsers *sub*."""
    parser = sub.add_parser(
        "dmarc",
        help="DMARC aggregate reports from the data the mx listeners keep",
        description="DMARC (RFC 7489) tools. The mx listeners count, per domain that "
        "publishes a DMARC policy, the messages by day, source IP, disposition and results "
        "(data_dir/dmarc, [mailauth] dmarc_reports).",
    )
    actions = parser.add_subparsers(dest="dmarc_command", metavar="ACTION", required=True)
    report = actions.add_parser(
        "report",
        help="print a domain's aggregate report (RFC 7489 Appendix C XML)",
        description="Print the aggregate report of DOMAIN (the domain whose _dmarc record "
        "applied, usually the organizational domain) for the UTC days that overlap "
        "[--since, --until). Times are ISO 8601 dates or date-times (UTC unless they say "
        "otherwise) or epoch seconds.",
    )
    report.set_defaults(handler=cmd_dmarc_report)
    report.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    report.add_argument("--data-dir", metavar="DIR", help="data directory (data_dir/dmarc)")
    report.add_argument("--domain", required=True, help="the policy domain to report on")
    report.add_argument("--since", required=True, metavar="T", help="start of the period")
    report.add_argument("--until", metavar="T", help="end of the period (default: now)")
    report.add_argument(
        "--org-name", metavar="NAME", help="report_metadata org_name (default server.hostname)"
    )
    report.add_argument(
        "--email",
        metavar="ADDRESS",
        help="report_metadata email (default postmaster@server.hostname)",
    )
    report.add_argument("--report-id", metavar="ID", help="report_id (default: derived)")


def parse_time(text: str) -> float:
    """Epoch seconds from *text*: a number of epoch seconds, or an ISO 8601 date or
    date-time (UTC unless it has an offset). Raises ValueError for anything else."""
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def cmd_dmarc_report(args: argparse.Namespace) -> int:
    """Print the report; 2 on a bad time, domain or configuration."""
    from tachymail.mailauth.dmarc import normalize_domain
    from tachymail.mailauth.reports import DmarcReports

    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(str(exc))
    times = []
    for option, text in (("--since", args.since), ("--until", args.until)):
        try:
            times.append(parse_time(text) if text else time.time())
        except ValueError:
            return _fail(f"{option}: not a time: {text!r} (ISO 8601 date, or epoch seconds)")
    since, until = times
    if until <= since:
        return _fail("--until must be after --since")
    domain = normalize_domain(args.domain)
    if not domain:
        return _fail(f"not a domain name: {args.domain!r}")
    hostname = config.server.hostname
    reports = DmarcReports(config.data_path)
    xml = reports.report(
        domain,
        since,
        until,
        reporter=args.org_name or hostname,
        email=args.email or f"postmaster@{hostname}",
        report_id=args.report_id,
    )
    if not reports.rows(domain, since, until):
        # still a valid report (scripts get XML), but say why it is empty
        print(f"tachymail: no DMARC data for {domain} in that period", file=sys.stderr)
    sys.stdout.buffer.write(xml)
    sys.stdout.flush()
    return 0
