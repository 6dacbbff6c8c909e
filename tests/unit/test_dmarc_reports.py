"""DMARC aggregate data (data_dir/dmarc) and the RFC 7489 Appendix C report XML, read back
with xml.etree; `tachymail dmarc report` run as a real command."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from server import run_cli, tachymail_cmd
from tachymail.mailauth.dkim import DkimResult
from tachymail.mailauth.dmarc import DmarcRecord, DmarcResult
from tachymail.mailauth.reports import DAY, DmarcReports
from tachymail.mailauth.spf import SpfResult

# midnight (UTC) three days ago: recent enough to be kept (keep_days), days after it too
DAY0 = (time.time() // DAY - 3) * DAY
DAY0_ISO = time.strftime("%Y-%m-%d", time.gmtime(DAY0))
DAY_BEFORE_ISO = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(DAY0 - DAY))
RECORD = DmarcRecord(p="reject", sp="quarantine", adkim="s", aspf="r", pct=50, fo="1")


def verdict(result: str = "pass", disposition: str = "none", **fields: object) -> DmarcResult:
    base: dict[str, object] = {
        "result": result,
        "from_domain": "news.example.com",
        "policy": "quarantine",
        "disposition": disposition,
        "spf_aligned": result == "pass",
        "dkim_aligned": False,
        "record_domain": "example.com",
        "record": RECORD,
    }
    base.update(fields)
    return DmarcResult(**base)  # type: ignore[arg-type]


SPF = SpfResult("pass", "mailfrom", "bounce.example.com", "b@bounce.example.com")
DKIM = (DkimResult("fail", "example.com", "sel1", "rsa-sha256", "", "abcdefgh"),)


def records(xml: bytes) -> list[ET.Element]:
    root = ET.fromstring(xml)
    assert root.tag == "feedback"
    return root.findall("record")


def row_of(record: ET.Element) -> dict[str, str | None]:
    return {
        "ip": record.findtext("row/source_ip"),
        "count": record.findtext("row/count"),
        "disposition": record.findtext("row/policy_evaluated/disposition"),
        "dkim": record.findtext("row/policy_evaluated/dkim"),
        "spf": record.findtext("row/policy_evaluated/spf"),
        "reason": record.findtext("row/policy_evaluated/reason/type"),
        "envelope_from": record.findtext("identifiers/envelope_from"),
        "header_from": record.findtext("identifiers/header_from"),
    }


def test_report_groups_counts_and_is_well_formed(tmp_path: Path) -> None:
    reports = DmarcReports(tmp_path)
    for _ in range(3):
        reports.add(verdict(), "192.0.2.1", "b@bounce.example.com", SPF, DKIM, when=DAY0 + 10)
    reports.add(
        verdict("fail", "quarantine", spf_aligned=False),
        "198.51.100.7",
        "x@evil.test",
        SpfResult("fail", "mailfrom", "evil.test", "x@evil.test"),
        (),
        when=DAY0 + 3600,
    )
    reports.add(
        verdict("fail", "none", spf_aligned=False),  # pct=50 did not select it
        "198.51.100.7",
        "<>",
        SpfResult("none", "mailfrom", "helo.evil.test", "postmaster@helo.evil.test"),
        (),
        when=DAY0 + 7200,
    )
    xml = reports.report(
        "example.com",
        DAY0,
        DAY0 + DAY,
        reporter="mx.tachymail.test",
        email="postmaster@tachymail.test",
    )
    assert xml.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    root = ET.fromstring(xml)
    assert root.findtext("report_metadata/org_name") == "mx.tachymail.test"
    assert root.findtext("report_metadata/email") == "postmaster@tachymail.test"
    assert root.findtext("report_metadata/report_id")
    assert root.findtext("report_metadata/date_range/begin") == str(int(DAY0))
    assert root.findtext("report_metadata/date_range/end") == str(int(DAY0 + DAY))
    published = {child.tag: child.text for child in root.find("policy_published") or []}
    assert published == {
        "domain": "example.com",
        "adkim": "s",
        "aspf": "r",
        "p": "reject",
        "sp": "quarantine",
        "pct": "50",
        "fo": "1",
    }
    rows = sorted(
        (row_of(r) for r in root.findall("record")),
        key=lambda r: (str(r["ip"]), str(r["disposition"])),
    )
    assert rows == [
        {
            "ip": "192.0.2.1",
            "count": "3",
            "disposition": "none",
            "dkim": "fail",
            "spf": "pass",
            "reason": None,
            "envelope_from": "bounce.example.com",
            "header_from": "news.example.com",
        },
        {
            "ip": "198.51.100.7",
            "count": "1",
            "disposition": "none",
            "dkim": "fail",
            "spf": "fail",
            "reason": "sampled_out",
            "envelope_from": "helo.evil.test",
            "header_from": "news.example.com",
        },
        {
            "ip": "198.51.100.7",
            "count": "1",
            "disposition": "quarantine",
            "dkim": "fail",
            "spf": "fail",
            "reason": None,
            "envelope_from": "evil.test",
            "header_from": "news.example.com",
        },
    ]
    first = next(r for r in root.findall("record") if r.findtext("row/source_ip") == "192.0.2.1")
    assert [
        (e.findtext("domain"), e.findtext("selector"), e.findtext("result"))
        for e in first.findall("auth_results/dkim")
    ] == [("example.com", "sel1", "fail")]
    assert [
        (e.findtext("domain"), e.findtext("scope"), e.findtext("result"))
        for e in first.findall("auth_results/spf")
    ] == [("bounce.example.com", "mfrom", "pass")]


def test_only_results_with_a_record_are_counted(tmp_path: Path) -> None:
    reports = DmarcReports(tmp_path)
    reports.add(verdict("none", record_domain="", record=None), "192.0.2.1", "a@b.test", SPF, ())
    reports.add(verdict("temperror", record=None), "192.0.2.1", "a@b.test", SPF, ())
    reports.add(verdict("permerror", record=None), "192.0.2.1", "a@b.test", SPF, ())
    reports.flush()
    assert reports.rows("example.com", 0, 4e9) == ()


def test_days_select_what_a_report_covers(tmp_path: Path) -> None:
    reports = DmarcReports(tmp_path)
    for day in range(3):
        for _ in range(day + 1):
            reports.add(verdict(), "192.0.2.1", "b@x.test", SPF, (), when=DAY0 + day * DAY + 5)
    count = lambda since, until: sum(  # noqa: E731
        int(r.findtext("row/count") or 0)
        for r in records(reports.report("example.com", since, until, reporter="r", email="e@r"))
    )
    assert count(DAY0, DAY0 + DAY) == 1
    assert count(DAY0 + DAY, DAY0 + 3 * DAY) == 2 + 3
    assert count(DAY0 + 100, DAY0 + 200) == 1  # part of a day: the whole day
    assert count(DAY0 - 10 * DAY, DAY0) == 0
    assert count(DAY0, DAY0 + 3 * DAY) == 6
    # another domain has its own data
    assert (
        records(reports.report("example.net", DAY0, DAY0 + 3 * DAY, reporter="r", email="e@r"))
        == []
    )
    assert reports.prune(DAY0 + DAY, batch=1) == 2  # the first day's row and its policy
    assert count(DAY0, DAY0 + 3 * DAY) == 5
    assert reports.prune(DAY0 + DAY) == 0


def test_counts_are_buffered_until_flushed(tmp_path: Path) -> None:
    writer = DmarcReports(tmp_path, flush_interval=3600)
    reader = DmarcReports(tmp_path)
    writer.add(verdict(), "192.0.2.1", "b@x.test", SPF, (), when=DAY0)
    writer.flush()  # the store exists now
    writer.add(verdict(), "192.0.2.1", "b@x.test", SPF, (), when=DAY0)
    assert [r["count"] for r in reader.rows("example.com", DAY0, DAY0 + DAY)] == [1]
    writer.flush()
    assert [r["count"] for r in reader.rows("example.com", DAY0, DAY0 + DAY)] == [2]
    # with flush_interval 0 every add is written at once
    eager = DmarcReports(tmp_path, flush_interval=0)
    eager.add(verdict(), "192.0.2.1", "b@x.test", SPF, (), when=DAY0)
    assert [r["count"] for r in reader.rows("example.com", DAY0, DAY0 + DAY)] == [3]


def test_several_processes_add_to_one_store(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from tachymail.mailauth.dmarc import DmarcRecord, DmarcResult
        from tachymail.mailauth.reports import DmarcReports
        result = DmarcResult(
            "pass", "example.com", "reject", "none", False, True, "example.com",
            record=DmarcRecord(p="reject"),
        )
        reports = DmarcReports(Path({str(tmp_path)!r}), flush_interval=0.001)
        for i in range(300):
            reports.add(result, "192.0.2.1", "b@x.test", None, (), when={DAY0})
        reports.close()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    try:
        for proc in procs:
            assert proc.wait(120) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = DmarcReports(tmp_path).rows("example.com", DAY0, DAY0 + DAY)
    assert [r["count"] for r in rows] == [1200]


def test_hostile_strings_still_make_well_formed_xml(tmp_path: Path) -> None:
    reports = DmarcReports(tmp_path)
    reports.add(
        verdict(),
        "192.0.2.1",
        "b@x.test",
        SPF,
        (DkimResult("pass", "example.com", "s\x00<&>\x1b", "rsa-sha256", "", "x"),),
        when=DAY0,
    )
    xml = reports.report("example.com", DAY0, DAY0 + DAY, reporter="a<b>&c", email="e@x")
    root = ET.fromstring(xml)
    assert root.findtext("report_metadata/org_name") == "a<b>&c"
    assert root.findtext("record/auth_results/dkim/selector") == "s\ufffd<&>\ufffd"


def test_the_report_elements_are_those_real_reports_use(tmp_path: Path, corpus: Path) -> None:
    """Every element path we write appears in the aggregate reports of the third-party
    corpus (reports real reporters sent, collected by the mail-auth project)."""
    folder = corpus / "auth" / "stalwart-mail-auth" / "resources" / "dmarc-feedback"
    if not folder.is_dir():
        pytest.skip(f"DMARC report samples not found at {folder}")
    known: set[str] = set()

    def walk(element: ET.Element, prefix: str) -> None:
        path = f"{prefix}/{element.tag}"
        known.add(path)
        for child in element:
            walk(child, path)

    for sample in sorted(folder.glob("*.xml")):
        walk(ET.parse(sample).getroot(), "")
    assert "/feedback/record/row/policy_evaluated/disposition" in known
    reports = DmarcReports(tmp_path)
    reports.add(
        verdict("fail", "none", spf_aligned=False), "192.0.2.1", "b@x.test", SPF, DKIM, when=DAY0
    )
    ours: set[str] = set()
    root = ET.fromstring(reports.report("example.com", DAY0, DAY0 + DAY, reporter="r", email="e@r"))

    def collect(element: ET.Element, prefix: str) -> None:
        path = f"{prefix}/{element.tag}"
        ours.add(path)
        for child in element:
            collect(child, path)

    collect(root, "")
    assert ours - known == set()


def test_cli_prints_the_report(tmp_path: Path) -> None:
    reports = DmarcReports(tmp_path)
    for _ in range(2):
        reports.add(verdict(), "192.0.2.9", "b@bounce.example.com", SPF, DKIM, when=DAY0 + 50)
    reports.close()
    out = run_cli(
        "dmarc",
        "report",
        "--domain",
        "Example.COM",
        "--since",
        DAY0_ISO,
        "--until",
        str(int(DAY0 + DAY)),
        "--org-name",
        "Test Org",
        data_dir=tmp_path,
    )
    root = ET.fromstring(out.encode())
    assert root.findtext("report_metadata/org_name") == "Test Org"
    assert root.findtext("policy_published/domain") == "example.com"
    assert [
        (r.findtext("row/source_ip"), r.findtext("row/count")) for r in records(out.encode())
    ] == [("192.0.2.9", "2")]
    # the day before has nothing
    out = run_cli(
        "dmarc",
        "report",
        "--domain",
        "example.com",
        "--since",
        DAY_BEFORE_ISO,
        "--until",
        DAY0_ISO,
        data_dir=tmp_path,
    )
    assert records(out.encode()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since: not a time"),
        (["--since", DAY0_ISO, "--until", DAY_BEFORE_ISO], "--until must be after --since"),
        (["--since", DAY0_ISO, "--domain", "a b"], "not a domain name"),
    ],
)
def test_cli_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    if "--domain" not in args:
        args = [*args, "--domain", "example.com"]
    out = subprocess.run(
        [*tachymail_cmd(), "dmarc", "report", *args, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert message in out.stderr
