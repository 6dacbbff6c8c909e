"""Dovecot's imaptest compliance scripts (../shared/corpus/imaptest-tests) run by our own
runner (tests/imaptest.py) against a private Dovecot, to show the runner judges as imaptest
does, and against a real ``tachymail serve`` with an imap listener.

Each run prints its report (script -> pass / skip / FAIL and the first mismatch) to the
test output; ``TACHYMAIL_IMAPTEST_REPORT=<dir>`` also writes it there as
imaptest-<server>.txt. The Tachymail run fails only for a script listed in
tests/imaptest_expected.txt (one script name per line, kept by the lead) that does not
pass: the list grows as the server learns, and a listed script that breaks is a regression.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dovecot import DovecotServer, running_dovecot
from imaptest import ScriptResult, parse_script, run_script, script_paths
from server import Server, running_server

SCRIPTS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "imaptest-tests"
EXPECTED = Path(__file__).resolve().parent.parent / "imaptest_expected.txt"
DOMAIN = "example.test"
#: Dovecot's users: names without a domain, as imaptest's urlauth scripts need (they build
#: imap://$username@$domain/ URLs, and $domain is then the host, 127.0.0.1)
USERS = [("imaptest1", "imaptest pass 1"), ("imaptest2", "imaptest pass 2")]
#: URLAUTH on (it keeps its keys in mailbox attributes)
DOVECOT_EXTRA = "imap_urlauth_host = *\nmail_attribute_dict = file:%h/dovecot-attributes\n"

#: scripts Dovecot 2.3.19 (Debian 12) itself does not pass, and why; everything else must
#: pass there or skip for a capability this Dovecot does not offer
DOVECOT_DIFFERENCES = {
    "urlauth-binary": (
        "Dovecot 2.3.19 panics on URLFETCH (url BINARY BODYPARTSTRUCTURE): assertion "
        "!cmd->executing in client_command_free; the connection drops"
    ),
    "urlauth2": (
        "Dovecot 2.3.19's imap-urlauth-login panics (assertion in sasl_server_auth_begin) "
        "when user 2 URLFETCHes user 1's URL: URLFETCH answers NO Internal error"
    ),
}
#: skipped on Dovecot for a capability it does not offer
DOVECOT_SKIPS = {"sort-partial": "CONTEXT=SORT: not implemented by Dovecot"}
#: most seconds one Tachymail reply may take before its script fails (a hang, not a speed
#: assertion), and the most the whole Tachymail run may take before the rest is not run
TACHYMAIL_REPLY_TIMEOUT = 5.0
TACHYMAIL_RUN_BUDGET = 150.0


@pytest.fixture(scope="module")
def scripts() -> list[Path]:
    if not SCRIPTS.is_dir():
        pytest.skip(f"imaptest scripts not found at {SCRIPTS} (they live in ../shared/corpus)")
    return script_paths(SCRIPTS)


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    with running_dovecot(dict(USERS), DOVECOT_EXTRA) as server:
        yield server


def script_users(index: int) -> list[tuple[str, str]]:
    """The two users of the *index*-th script on Tachymail (local users are addresses):
    each script has its own, so that sessions a failed script leaves behind cannot hit the
    next one's per-user limit."""
    return [(f"script{index}-{n}@{DOMAIN}", f"imaptest pass {n}") for n in (1, 2)]


def run_all(
    paths: list[Path],
    port: int,
    *,
    timeout: float,
    users: Callable[[int], list[tuple[str, str]]] = lambda _: USERS,
    budget: float | None = None,
) -> dict[str, ScriptResult]:
    """Every script's result, in order; past *budget* seconds the rest are not run."""
    results: dict[str, ScriptResult] = {}
    started = time.monotonic()
    for index, path in enumerate(paths):
        if budget is not None and time.monotonic() - started > budget:
            results[path.name] = ScriptResult(path.name, False, reason="not run: time budget")
            continue
        results[path.name] = run_script(path, "127.0.0.1", port, users(index), timeout=timeout)
    return results


def report(
    server: str, results: dict[str, ScriptResult], capsys: pytest.CaptureFixture[str]
) -> str:
    """The report as text, printed to the test output (and saved, see the docstring)."""
    counts = {"pass": 0, "skip": 0, "FAIL": 0}
    lines = []
    for name, result in results.items():
        counts[result.outcome] += 1
        reason = result.reason.replace("\n", "\n" + " " * 30)
        lines.append(f"{result.outcome:5} {name:23} {reason}".rstrip())
    text = (
        f"imaptest scripts against {server}: {counts['pass']} pass, {counts['FAIL']} fail, "
        f"{counts['skip']} skipped of {len(results)}\n" + "\n".join(lines) + "\n"
    )
    with capsys.disabled():
        print("\n" + text)
    target = os.environ.get("TACHYMAIL_IMAPTEST_REPORT")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / f"imaptest-{server}.txt").write_text(text)
    return text


def expected_passing() -> list[str]:
    """The script names tests/imaptest_expected.txt lists (blank lines and # comments out)."""
    if not EXPECTED.exists():
        return []
    names = []
    for line in EXPECTED.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def test_dovecot_passes_the_scripts_the_runner_judges(
    scripts: list[Path], dovecot: DovecotServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runner's sanity: Dovecot, the reference, passes what it should."""
    results = run_all(scripts, dovecot.ports["imap"], timeout=20)
    text = report("dovecot", results, capsys)
    failed = {n for n, r in results.items() if r.outcome == "FAIL"}
    skipped = {n for n, r in results.items() if r.skipped}
    assert failed == set(DOVECOT_DIFFERENCES), text
    assert skipped == set(DOVECOT_SKIPS), text
    assert sum(r.passed for r in results.values()) >= 60, text


# Each mutation turns a script Dovecot passes into one it must fail, and the reason the
# runner gives: a runner that cannot fail would pass these.
MUTATIONS = [
    # a wrong value in an untagged reply
    (
        "fetch",
        "* 3 fetch (uid $uid3)\n\nok fetch 3:1",
        "* 3 fetch (uid 999)\n\nok fetch 3:1",
        "missing 1 untagged replies",
    ),
    # a wrong tagged status
    ("select", "ok [read-only]", "no [read-only]", "expected tagged 'no [read-only]'"),
    # a reply that must not come does come
    ("fetch", "ok fetch * uid\n* 3", "ok fetch * uid\n! 3", "unexpected untagged match"),
    # a flag the server does not have, in an unordered FLAGS list with no extras allowed
    (
        "store",
        "* 4 fetch (flags ($$hello $$world))",
        "* 4 fetch (flags ($$hello))",
        "missing 1 untagged replies",
    ),
    # a variable captured once must match later
    (
        "esearch",
        "* esearch (tag $tag) uid min $uid2",
        "* esearch (tag $tag) uid min $uid4",
        "missing 1 untagged replies",
    ),
    # a literal's content
    (
        "fetch-body",
        "body1\n\n\n}}})\nok fetch 1 rfc822.text",
        "body2\n\n\n}}})\nok fetch 1 rfc822.text",
        "missing 1 untagged replies",
    ),
]


@pytest.mark.parametrize(
    ("script", "old", "new", "reason"),
    MUTATIONS,
    ids=[f"{m[0]}-{i}" for i, m in enumerate(MUTATIONS)],
)
def test_the_runner_fails_a_wrong_expectation(
    scripts: list[Path],
    dovecot: DovecotServer,
    tmp_path: Path,
    script: str,
    old: str,
    new: str,
    reason: str,
) -> None:
    text = (SCRIPTS / script).read_text(encoding="latin-1")
    assert text.count(old) == 1, f"{script} changed: the mutation no longer applies"
    (tmp_path / script).write_text(text.replace(old, new), encoding="latin-1")
    for mbox in (f"{script}.mbox", "default.mbox"):
        if (SCRIPTS / mbox).exists():
            shutil.copy(SCRIPTS / mbox, tmp_path / mbox)
    original = run_script(SCRIPTS / script, "127.0.0.1", dovecot.ports["imap"], USERS)
    assert original.passed, original.reason
    mutated = run_script(tmp_path / script, "127.0.0.1", dovecot.ports["imap"], USERS)
    assert not mutated.passed and not mutated.skipped
    assert reason in mutated.reason, mutated.reason


def imap_listener_built() -> bool:
    return importlib.util.find_spec("tachymail.imap.session") is not None


@pytest.fixture(scope="module")
def tachymail(tmp_path_factory: pytest.TempPathFactory, scripts: list[Path]) -> Iterator[Server]:
    if not imap_listener_built():
        pytest.xfail("IMAP listener not built yet")
    from tachymail.auth.users import UsersFile

    tmp_path = tmp_path_factory.mktemp("imaptest")
    config = (
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\n'
        "[auth]\nfailure_delay = 0.1\n"
        "[imap]\nplaintext_auth = true\n"
    )
    with running_server(tmp_path, config, roles=("imap",)) as server:
        users = UsersFile(server.data_dir / "users")
        for index, path in enumerate(scripts):
            # the second user only where a script logs one in (hashing costs 0.1 s each)
            needed = 2 if parse_script(path).users else 1
            for name, password in script_users(index)[:needed]:
                users.add(name, password)
        yield server


def test_tachymail_passes_the_expected_scripts(
    scripts: list[Path], tachymail: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run_all(
        scripts,
        tachymail.ports["imap"],
        timeout=TACHYMAIL_REPLY_TIMEOUT,
        users=script_users,
        budget=TACHYMAIL_RUN_BUDGET,
    )
    text = report("tachymail", results, capsys)
    expected = expected_passing()
    unknown = [n for n in expected if n not in results]
    assert not unknown, f"tests/imaptest_expected.txt names scripts that do not exist: {unknown}"
    regressions = [n for n in expected if not results[n].passed]
    assert not regressions, f"listed as passing but failed: {regressions}\n{text}"


@pytest.mark.parametrize("script", ["multiappend", "catenate", "fetch-body"])
def test_synchronizing_literals(scripts: list[Path], dovecot: DovecotServer, script: str) -> None:
    """The runner's other literal path: every literal (the setup's APPENDs, the script's
    {{{ blocks) waits for the server's "+" instead of going as LITERAL+."""
    result = run_script(
        SCRIPTS / script, "127.0.0.1", dovecot.ports["imap"], USERS, literal_plus=False
    )
    assert result.passed, result.reason


# Small scripts of our own for the rules the corpus exercises little, each with whether
# Dovecot must pass it and, if not, the reason the runner must give.
OWN_SCRIPTS = {
    "banner": ("state: nonauth\n\n* ok [capability $]\n\nok noop\n", ""),
    "banner-wrong": ("state: nonauth\n\n* bye\n\nok noop\n", "banner: missing 1"),
    "ordered": (
        "messages: 2\n\nok fetch 1:2 uid\n!ordered\n* 1 fetch (uid $a)\n* 2 fetch (uid $b)\n",
        "",
    ),
    "ordered-wrong": (
        "messages: 2\n\nok fetch 1:2 uid\n!ordered\n* 2 fetch (uid $b)\n* 1 fetch (uid $a)\n",
        "missing 1 untagged replies",
    ),
    "no-extra": (
        "ignore_extra_untagged: no\nmessages: 2\n\n"
        "ok fetch 1:2 uid\n* 1 fetch (uid $a)\n* 2 fetch (uid $b)\n",
        "",
    ),
    "no-extra-wrong": (
        "ignore_extra_untagged: no\nmessages: 2\n\nok fetch 1:2 uid\n* 1 fetch (uid $a)\n",
        "1 unexpected untagged replies",
    ),
    "bad-expected": ("state: auth\n\nbad frobnicate\n", ""),
    "bad-unexpected": ('state: auth\n\n"" frobnicate\n', "got BAD"),
    "relative-seq": (
        "connections: 2\nmessages: 3\n\n1 ok fetch 3 uid\n* 3 fetch (uid $u3)\n"
        "1 ok store 1 +flags \\deleted\n1 ok expunge\n"
        "2 ok uid fetch $u3 uid\n* $1 expunge\n* $3 fetch (uid $u3)\n",
        "",
    ),
}


@pytest.mark.parametrize("name", list(OWN_SCRIPTS))
def test_runner_rules_on_dovecot(
    scripts: list[Path], dovecot: DovecotServer, tmp_path: Path, name: str
) -> None:
    text, reason = OWN_SCRIPTS[name]
    (tmp_path / name).write_text(text)
    shutil.copy(SCRIPTS / "default.mbox", tmp_path / "default.mbox")
    result = run_script(tmp_path / name, "127.0.0.1", dovecot.ports["imap"], USERS)
    if reason:
        assert not result.passed and reason in result.reason, result.reason
    else:
        assert result.passed, result.reason
