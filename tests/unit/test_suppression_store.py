"""The suppression list's store: scopes, case, expiry, paging, CSV import."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from tachymail.queue.suppression import (
    SuppressionError,
    SuppressionList,
    parse_csv,
    parse_expiry,
)

NOW = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    suppressions = SuppressionList(tmp_path)
    try:
        yield suppressions
    finally:
        suppressions.close()


def test_global_and_domain_scopes(store: SuppressionList) -> None:
    assert store.is_empty()
    store.add("gone@example.com", reason="550 5.1.1 no such user", source="bounce", now=NOW)
    store.add("opted-out@example.com", scope="Shop.Example.NET", source="api", now=NOW)
    assert not store.is_empty()
    hit = store.check("gone@example.com", "anything.example", now=NOW)
    assert hit is not None
    assert (hit.scope, hit.reason, hit.source, hit.created) == (
        "global",
        "550 5.1.1 no such user",
        "bounce",
        NOW,
    )
    # a domain-scoped entry refuses only that sender domain
    assert store.check("opted-out@example.com", "shop.example.net", now=NOW) is not None
    assert store.check("opted-out@example.com", "news.example.net", now=NOW) is None
    assert store.check("opted-out@example.com", "", now=NOW) is None
    assert store.check("someone-else@example.com", "shop.example.net", now=NOW) is None


def test_whole_address_is_case_insensitive(store: SuppressionList) -> None:
    store.add("<John.Smith@Example.COM>", now=NOW)
    for variant in ("john.smith@example.com", "JOHN.SMITH@EXAMPLE.COM", "<John.Smith@example.com>"):
        hit = store.check(variant, now=NOW)
        assert hit is not None and hit.address == "john.smith@example.com"
    assert store.remove("JOHN.smith@example.com")
    assert store.is_empty()
    assert not store.remove("john.smith@example.com")


def test_expiry_is_honoured_at_check_time_and_swept(store: SuppressionList) -> None:
    store.add("temp@example.com", expires=NOW + 60, now=NOW)
    store.add("forever@example.com", now=NOW)
    assert store.check("temp@example.com", now=NOW + 59) is not None
    assert store.check("temp@example.com", now=NOW + 60) is None
    listed, _ = store.list(now=NOW + 61)
    assert [s.address for s in listed] == ["forever@example.com"]
    assert store.count() == 2
    assert store.sweep(now=NOW + 61) == 1
    assert store.count() == 1


def test_replacing_an_entry_keeps_one(store: SuppressionList) -> None:
    store.add("a@example.com", reason="first", now=NOW)
    store.add("A@example.com", reason="second", now=NOW + 1)
    assert store.count() == 1
    hit = store.check("a@example.com", now=NOW + 1)
    assert hit is not None and hit.reason == "second"


def test_bad_entries_are_refused(store: SuppressionList) -> None:
    for address in (
        "",
        "no-at-sign",
        "@example.com",
        "user@",
        "a b@example.com",
        "x" * 250 + "@e.com",
    ):
        with pytest.raises(SuppressionError, match="not an address"):
            store.add(address)
    with pytest.raises(SuppressionError, match="not a scope"):
        store.add("a@example.com", scope="not a domain")
    with pytest.raises(SuppressionError, match="not a source"):
        store.add("a@example.com", source="magic")
    assert store.is_empty()
    # an over-long address at check time is simply not suppressed (never a crash)
    assert store.check("y" * 600 + "@example.com", "z" * 600) is None


def test_paging_walks_every_entry_once(store: SuppressionList) -> None:
    for i in range(25):
        store.add(f"user{i:02d}@example.com", now=NOW)
    for i in range(5):
        store.add(f"user{i:02d}@example.com", scope="shop.example", now=NOW)
    seen = []
    cursor = None
    pages = 0
    while True:
        page, cursor = store.list(cursor=cursor, limit=7, now=NOW)
        pages += 1
        seen += [(s.scope, s.address) for s in page]
        if cursor is None:
            break
    assert len(seen) == 30 and len(set(seen)) == 30
    assert pages == 5
    scoped, more = store.list(scope="SHOP.example", limit=100, now=NOW)
    assert more is None
    assert [s.address for s in scoped] == [f"user{i:02d}@example.com" for i in range(5)]
    with pytest.raises(SuppressionError, match="not a cursor"):
        store.list(cursor="!!!")


def test_expiry_parsing() -> None:
    assert parse_expiry("", NOW) == 0.0
    assert parse_expiry("0", NOW) == 0.0
    assert parse_expiry("30d", NOW) == NOW + 30 * 86400
    assert parse_expiry("12h", NOW) == NOW + 12 * 3600
    assert parse_expiry("1900000000", NOW) == 1_900_000_000.0
    assert parse_expiry("2030-01-01T00:00:00Z", NOW) == 1_893_456_000.0
    assert parse_expiry("2030-01-01", NOW) == 1_893_456_000.0
    with pytest.raises(SuppressionError, match="not an expiry"):
        parse_expiry("next tuesday", NOW)


def test_csv_import(store: SuppressionList) -> None:
    lines = [
        "address,scope,reason,expires\n",
        "one@example.com,,hard bounce,\n",
        'Two@Example.com,shop.example,"unsubscribed, by mail",30d\n',
        "\n",
        "three@example.com,global,,2030-01-01\n",
    ]
    assert store.import_csv(lines, now=NOW) == 3
    two = store.check("two@example.com", "shop.example", now=NOW)
    assert two is not None
    assert (two.reason, two.source, two.expires) == (
        "unsubscribed, by mail",
        "import",
        NOW + 30 * 86400,
    )
    three = store.check("three@example.com", now=NOW)
    assert three is not None and three.expires == 1_893_456_000.0


def test_csv_errors_name_the_lines_and_store_nothing(store: SuppressionList) -> None:
    lines = [
        "address,scope,reason,expires\n",
        "good@example.com,,,\n",
        "not-an-address,,,\n",
        "ok@example.com,bad scope,,\n",
        "ok2@example.com,,,someday\n",
        "a@example.com,,,,extra\n",
    ]
    with pytest.raises(SuppressionError) as caught:
        store.import_csv(lines, now=NOW)
    message = str(caught.value)
    assert "line 3: not an address: 'not-an-address'" in message
    assert "line 4: not a scope" in message
    assert "line 5: not an expiry" in message
    assert "line 6: 5 fields, at most 4" in message
    assert "line 2" not in message
    assert store.is_empty()  # all or nothing
    with pytest.raises(SuppressionError, match="line 1: the header must be"):
        parse_csv(["email,why\n", "a@example.com,x\n"])
    with pytest.raises(SuppressionError, match="line 1: empty file"):
        parse_csv([])


def _add_from_another_process(data_path: str) -> None:
    other = SuppressionList(Path(data_path))
    other.add("from-child@example.com", source="cli")
    other.close()


def test_shared_by_processes(store: SuppressionList, tmp_path: Path) -> None:
    # opened first here, as a worker would; another process (the CLI) adds an entry
    assert store.check("from-child@example.com") is None
    child = multiprocessing.get_context("spawn").Process(
        target=_add_from_another_process, args=(str(tmp_path),)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0
    hit = store.check("from-child@example.com")
    assert hit is not None and hit.source == "cli"
    assert not store.is_empty()
