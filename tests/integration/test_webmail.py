"""The webmail page at /mail/ in a real browser (Debian's chromium driven by Playwright).

A real `tachymail serve` with an mx and an http listener and one local user; mail arrives
by smtplib a moment before the browser signs in. The browser test signs in by filling the
form's ``username`` and ``password`` inputs, finds the plain-text message's subject in the
list as text (its ``<b>`` stays characters), opens it with the keyboard, replies, and the
reply arrives at a recording SMTP peer (the reply's domain is routed there by a
``[[route]]``). A malicious HTML message (a <script>, on* handlers, a remote image on a
small local HTTP server that records every hit, a stylesheet, a frame, a form) runs
nothing (no marker, no console line of its own) and loads nothing until "Show images" is
clicked; then the image, and only the image, is fetched.

Without the browser: the static files are served with the page's Content-Security-Policy
and the right types, and nothing else under /mail/ is (no listing, no ``..``).

The browser tests skip when Playwright or /usr/bin/chromium is missing (a failure under
TACHYMAIL_REQUIRE_ALL=1, see tests/conftest.py).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import re
import shutil
import smtplib
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recording_sink import RecordingSink, recording_sink
from server import Server, running_server, wait_until
from tachymail.auth.users import UsersFile

DOMAIN = "example.test"
REMOTE = "remote.test"
USER = f"alice@{DOMAIN}"
PASSWORD = "webmail pass 1"
SENDER = f"bob@{REMOTE}"
CHROMIUM = "/usr/bin/chromium"

PLAIN_SUBJECT = "Lunch on <b>Friday</b> & more"
PLAIN_BODY = "Shall we meet at noon?\nThe usual place.\n"
EVIL_SUBJECT = "Your parcel is waiting"

#: the pixel server's paths the malicious message may ever make the browser fetch, and then
#: only after "Show images"
IMAGE_PATHS = {"/pixel", "/background"}


class HitRecorder(http.server.ThreadingHTTPServer):
    """A tiny HTTP server on 127.0.0.1 that answers everything with a 1x1 GIF and records
    the path of every request."""

    daemon_threads = True

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _HitHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def paths(self) -> list[str]:
        with self.lock:
            return list(self.hits)


class _HitHandler(http.server.BaseHTTPRequestHandler):
    GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

    def _answer(self) -> None:
        server = self.server
        assert isinstance(server, HitRecorder)
        with server.lock:
            server.hits.append(self.path.split("?")[0])
        self.send_response(200)
        self.send_header("Content-Type", "image/gif")
        self.send_header("Content-Length", str(len(self.GIF)))
        self.end_headers()
        self.wfile.write(self.GIF)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def evil_html(port: int) -> str:
    """Every way an HTML message might run code or reach the network; each says PWNED."""
    base = f"http://127.0.0.1:{port}"
    return f"""<!doctype html><html><head>
<script>document.title = "PWNED-title"; console.log("PWNED-script");
fetch("{base}/script"); try {{ parent.document.body.dataset.pwned = "1"; }} catch (e) {{}}</script>
<link rel="stylesheet" href="{base}/style.css">
<style>body {{ background: url({base}/background); }}</style>
<meta http-equiv="refresh" content="0; url={base}/refresh">
</head><body onload="console.log('PWNED-onload'); new Image().src = '{base}/onload'">
<p id="hello">Dear customer, your parcel is waiting.</p>
<img id="logo" src="cid:logo@parcel.test" alt="logo">
<img id="remote" src="{base}/pixel" alt="tracker" width="1" height="1">
<img src="data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
     onerror="console.log('PWNED-onerror')" onload="console.log('PWNED-imgload')">
<form id="claim" action="{base}/form" method="post"><input name="card" value="4111">
<button id="go" type="submit">Claim</button></form>
<iframe src="{base}/frame"></iframe><object data="{base}/object"></object>
<a id="js" href="javascript:console.log('PWNED-link')">details</a>
</body></html>"""


@dataclass
class Webmail:
    server: Server
    sink: RecordingSink
    pixels: HitRecorder

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.ports['http']}"


def send(server: Server, message: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
        smtp.send_message(message, SENDER, [USER])


def basic_auth() -> dict[str, str]:
    credentials = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {credentials}"}


def jmap(webmail: Webmail, calls: list[Any]) -> dict[str, Any]:
    """One JMAP request with HTTP Basic (127.0.0.1 is a trusted client), each call's
    accountId the user's; the responses by call id."""
    with urllib.request.urlopen(
        urllib.request.Request(webmail.base + "/.well-known/jmap", headers=basic_auth()),
        timeout=10,
    ) as response:
        session = json.load(response)
    account = session["primaryAccounts"]["urn:ietf:params:jmap:mail"]
    request = urllib.request.Request(
        session["apiUrl"],
        data=json.dumps(
            {
                "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
                "methodCalls": [
                    [name, {**args, "accountId": account}, i] for name, args, i in calls
                ],
            }
        ).encode(),
        headers={**basic_auth(), "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.load(response)
    return {call_id: args for _, args, call_id in body["methodResponses"]}


def inbox_subjects(webmail: Webmail) -> set[str]:
    try:
        answer = jmap(
            webmail,
            [
                ["Email/query", {"limit": 50}, "q"],
                [
                    "Email/get",
                    {
                        "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                        "properties": ["subject"],
                    },
                    "g",
                ],
            ],
        )
    except (urllib.error.URLError, OSError, KeyError):
        return set()
    return {email["subject"] for email in answer.get("g", {}).get("list", [])}


@pytest.fixture(scope="module")
def webmail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webmail]:
    tmp_path = tmp_path_factory.mktemp("webmail")
    pixels = HitRecorder()
    thread = threading.Thread(target=pixels.serve_forever, daemon=True)
    thread.start()
    try:
        with recording_sink(tmp_path) as sink:
            config = (
                f'[policy]\nlocal_domains = ["{DOMAIN}"]\n'
                f"[auth]\nfailure_delay = 0.2\n"
                f'[[route]]\ndomain = "{REMOTE}"\nhost = "{sink.target}"\ntls = "none"\n'
            )
            # hold=False: mail is delivered into the mailbox, and the reply to the sink
            with running_server(tmp_path, config, roles=("mx", "http"), hold=False) as server:
                UsersFile(server.data_dir / "users").add(USER, PASSWORD)
                yield Webmail(server, sink, pixels)
    finally:
        pixels.shutdown()
        pixels.server_close()
        thread.join(10)


# --- the static files, without a browser ------------------------------------------------------


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def raw_get(port: int, path: str) -> int:
    """The status of GET *path* sent as it is (urllib would normalise the dots away)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_static_files_with_the_page_policy(webmail: Webmail) -> None:
    status, headers, body = fetch(webmail.base + "/mail/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    policy = headers["Content-Security-Policy"]
    for directive in (
        "default-src 'self'",
        "frame-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ):
        assert directive in policy
    assert "script-src" not in policy  # scripts from default-src 'self' only, none inline
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b'name="username"' in body and b'name="password"' in body
    for name, kind in (
        ("app.js", "text/javascript"),
        ("jmap.js", "text/javascript"),
        ("render.js", "text/javascript"),
        ("style.css", "text/css"),
    ):
        status, headers, body = fetch(f"{webmail.base}/mail/{name}")
        assert status == 200, name
        assert headers["Content-Type"].split(";")[0] == kind
        assert headers["Content-Security-Policy"] == policy
        assert body
    # /mail redirects to /mail/; nothing else is served: no listing, no way out of the folder
    assert fetch(webmail.base + "/mail")[0] == 200
    port = webmail.server.ports["http"]
    for path in (
        "/mail/nothing.js",
        "/mail/../webmail.py",
        "/mail/%2e%2e/webmail.py",
        "/mail/..%2fwebmail.py",
        "/mail/webmail/index.html",
        "/mail//etc/passwd",
        "/mail/.hidden",
    ):
        assert raw_get(port, path) == 404, path


# --- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright (pip, ./dev installs it) is not installed"
    )
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if executable is None:
        pytest.skip(f"chromium is not installed at {CHROMIUM} (apt install chromium)")
    with sync_api.sync_playwright() as playwright:
        # Debian's browser, not one Playwright downloads; no sandbox: tests may run as root
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox"], headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


def test_read_reply_and_a_malicious_message(webmail: Webmail, browser: Any) -> None:
    from playwright.sync_api import expect

    pixel_port = webmail.pixels.port
    plain = EmailMessage()
    plain["From"] = f"Bob <{SENDER}>"
    plain["To"] = USER
    plain["Subject"] = PLAIN_SUBJECT
    plain["Message-ID"] = "<lunch.1@remote.test>"
    plain.set_content(PLAIN_BODY)
    send(webmail.server, plain)
    evil = EmailMessage()
    evil["From"] = f"Parcel Service <{SENDER}>"
    evil["To"] = USER
    evil["Subject"] = EVIL_SUBJECT
    evil.set_content("Your parcel is waiting (text part).")
    evil.add_alternative(evil_html(pixel_port), subtype="html")
    # an image of its own (multipart/related, cid:): shown at once, as a data: URL
    evil.get_payload()[1].add_related(
        _HitHandler.GIF, maintype="image", subtype="gif", cid="<logo@parcel.test>"
    )
    send(webmail.server, evil)
    wait_until(lambda: {PLAIN_SUBJECT, EVIL_SUBJECT} <= inbox_subjects(webmail), timeout=20)

    context = browser.new_context()
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.set_default_timeout(15000)
    try:
        page.goto(webmail.base + "/mail/")

        # a wrong password: the form says so and stays
        page.fill("input[name=username]", USER)
        page.fill("input[name=password]", "not the password")
        page.click("form#signin button[type=submit]")
        expect(page.locator("#signin-error")).to_contain_text("not right")

        page.fill("input[name=username]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("form#signin button[type=submit]")

        # the list shows each subject as text; the <b> in it is characters, not markup
        rows = page.locator("#message-list li.row")
        plain_row = rows.filter(has_text=PLAIN_SUBJECT)
        expect(plain_row).to_have_count(1)
        assert plain_row.locator(".subject").inner_text() == PLAIN_SUBJECT
        assert plain_row.locator("b").count() == 0
        expect(plain_row).to_have_class("row unread")
        expect(page.locator("#mailbox-list .mailbox[aria-current=true] .count")).to_have_text(
            f"{inbox_unread(webmail)} unread"
        )
        assert page.evaluate("Boolean(sessionStorage.getItem('tachymail.token'))")

        # keyboard: the newest message (the malicious one) is first; j moves down, Enter opens
        expect(rows.first).to_contain_text(EVIL_SUBJECT)
        rows.first.focus()
        page.keyboard.press("j")
        expect(plain_row).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("#reader-subject")).to_have_text(PLAIN_SUBJECT)
        expect(page.locator("#reader-subject")).to_be_focused()
        expect(page.locator("#reader-body .text-body")).to_have_text(PLAIN_BODY.rstrip("\n"))
        expect(plain_row).to_have_class("row")  # read now ($seen set over JMAP)

        # reply: the compose form is filled in; the reply reaches the recording peer
        page.click("#reply-button")
        expect(page.locator("#compose-to")).to_have_value(f"Bob <{SENDER}>")
        expect(page.locator("#compose-subject")).to_have_value(f"Re: {PLAIN_SUBJECT}")
        page.locator("#compose-body").press("Home")
        page.locator("#compose-body").type("Noon suits me. ")
        page.click("#send-button")
        expect(page.locator("#status")).to_have_text("Message sent.")
        arrived = at_the_peer(webmail, f"Re: {PLAIN_SUBJECT}")
        assert arrived["rcpts"] == [SENDER]
        assert arrived["sender"] == USER
        headers = arrived["headers"]
        assert f"Subject: Re: {PLAIN_SUBJECT}" in headers
        assert "In-Reply-To: <lunch.1@remote.test>" in headers
        assert f"From: {USER}" in headers or f"<{USER}>" in headers

        # the malicious message: nothing runs, nothing loads
        page.click("#back-button")
        rows.filter(has_text=EVIL_SUBJECT).click()
        expect(page.locator("#reader-subject")).to_have_text(EVIL_SUBJECT)
        frame_element = page.locator("#reader-body iframe")
        expect(frame_element).to_have_count(1)
        sandbox = frame_element.get_attribute("sandbox")
        assert sandbox is not None and "allow-scripts" not in sandbox
        assert "allow-same-origin" not in sandbox and "allow-forms" not in sandbox
        frame = page.frame_locator("#reader-body iframe")
        expect(frame.locator("#hello")).to_have_text("Dear customer, your parcel is waiting.")
        logo = frame.locator("#logo")
        assert (logo.get_attribute("src") or "").startswith("data:image/gif;base64,")
        wait_until(lambda: logo.evaluate("image => image.complete && image.naturalWidth") == 1)
        frame.locator("#go").click()  # a form in a frame without allow-forms is not sent
        frame.locator("#js").click()
        page.wait_for_timeout(1000)  # what would load or run has had its moment (and the
        # console events of that second are dispatched: a sleep would not pump them)
        assert webmail.pixels.paths() == []
        assert [line for line in console if "PWNED" in line] == []
        assert page.title() == "Tachymail"
        assert page.evaluate("document.body.dataset.pwned") is None
        images = page.locator("#images-button")
        expect(images).to_be_visible()

        # the reader allows images: the remote image (and the background) load, nothing else
        images.click()
        wait_until(lambda: "/pixel" in webmail.pixels.paths(), timeout=10)
        page.wait_for_timeout(500)
        assert set(webmail.pixels.paths()) <= IMAGE_PATHS
        assert [line for line in console if "PWNED" in line] == []
        expect(images).to_be_hidden()

        # another tab starts signed out: the token is in this tab's sessionStorage only
        other = context.new_page()
        other.goto(webmail.base + "/mail/")
        expect(other.locator("input[name=username]")).to_be_visible()
        other.close()
    finally:
        print("the browser's console:", *console, sep="\n")  # shown when the test fails
        with contextlib.suppress(Exception):
            print("status line:", page.locator("#status").inner_text(timeout=1000))
            print("compose error:", page.locator("#compose-error").inner_text(timeout=1000))
        context.close()


def inbox_unread(webmail: Webmail) -> int:
    """The Inbox's unread count as the server tells it (Mailbox/get)."""
    boxes = jmap(webmail, [["Mailbox/get", {"ids": None}, "m"]])["m"]["list"]
    [inbox] = [box for box in boxes if box["role"] == "inbox"]
    return int(inbox["unreadEmails"])


def at_the_peer(webmail: Webmail, subject: str) -> dict[str, Any]:
    """The message titled *subject* the recording peer accepted (waiting for it)."""
    line = f"Subject: {subject}\r\n"
    wait_until(lambda: any(line in m["headers"] for m in webmail.sink.messages()), timeout=30)
    [found] = [m for m in webmail.sink.messages() if line in m["headers"]]
    return found


def sign_in(page: Any, webmail: Webmail, user: str = USER) -> None:
    page.goto(webmail.base + "/mail/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("form#signin button[type=submit]")
    page.locator("#mailbox-list .mailbox[aria-current=true]").wait_for(state="visible")


def emails_with_subject(webmail: Webmail, subject: str) -> list[dict[str, Any]]:
    """The user's messages titled *subject*, with their mailboxes (by role) and keywords."""
    answer = jmap(
        webmail,
        [
            ["Mailbox/get", {"ids": None, "properties": ["role"]}, "m"],
            ["Email/query", {"filter": {"subject": subject}}, "q"],
            [
                "Email/get",
                {
                    "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                    "properties": ["subject", "mailboxIds", "keywords", "from"],
                },
                "g",
            ],
        ],
    )
    roles = {box["id"]: box["role"] for box in answer["m"]["list"]}
    found = []
    for email in answer["g"]["list"]:
        if email["subject"] == subject:
            email["roles"] = {roles.get(box) for box in email["mailboxIds"]}
            found.append(email)
    return found


def test_compose_with_attachment_push_flag_search_trash(webmail: Webmail, browser: Any) -> None:
    from playwright.sync_api import expect

    subject = "Quarterly numbers"
    attachment = b"region,total\r\nnorth,42\r\n" * 20
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.set_default_timeout(15000)
    try:
        with page.expect_request(lambda request: "/jmap/eventsource" in request.url) as push:
            sign_in(page, webmail)
        assert "access_token=" in push.value.url and "types=*" in unquote(push.value.url)
        rows = page.locator("#message-list li.row")

        # compose (the "c" key), attach a file (a blob upload), send to ourselves
        page.locator("#message-list").focus()
        page.keyboard.press("c")
        expect(page.locator("#compose")).to_be_visible()
        expect(page.locator("#compose-to")).to_be_focused()
        page.fill("#compose-to", f"Alice <{USER}>")
        page.fill("#compose-subject", subject)
        page.fill("#compose-body", "The figures are attached.\n")
        page.set_input_files(
            "#compose-files",
            files=[{"name": "numbers.csv", "mimeType": "text/csv", "buffer": attachment}],
        )
        expect(page.locator("#compose-attachments li")).to_contain_text("numbers.csv")
        page.click("#send-button")
        expect(page.locator("#status")).to_have_text("Message sent.")
        expect(page.locator("#compose")).to_be_hidden()

        # it comes back through SMTP delivery into the Inbox; the list learns of it by push
        # (sending refreshes the mailbox counts only)
        row = rows.filter(has_text=subject)
        expect(row).to_have_count(1, timeout=20000)
        expect(row).to_have_class("row unread")
        wait_until(lambda: any("sent" in e["roles"] for e in emails_with_subject(webmail, subject)))
        [sent] = [e for e in emails_with_subject(webmail, subject) if "sent" in e["roles"]]
        assert "$draft" not in sent["keywords"] and "drafts" not in sent["roles"]

        # read it: the attachment downloads with its bytes
        row.click()
        expect(page.locator("#reader-subject")).to_have_text(subject)
        link = page.locator("#attachment-list a")
        expect(link).to_contain_text("numbers.csv")
        with page.expect_download() as download_info:
            link.click()
        download = download_info.value
        assert download.suggested_filename == "numbers.csv"
        assert Path(download.path()).read_bytes() == attachment

        # forward it, attachment included (the original's blob), to the recording peer
        page.click("#forward-button")
        expect(page.locator("#compose-subject")).to_have_value(f"Fwd: {subject}")
        expect(page.locator("#compose-attachments li")).to_contain_text("numbers.csv")
        expect(page.locator("#compose-body")).to_have_value(re.compile("The figures are attached"))
        page.fill("#compose-to", f"dave@{REMOTE}")
        page.click("#send-button")
        expect(page.locator("#status")).to_have_text("Message sent.")
        forwarded = at_the_peer(webmail, f"Fwd: {subject}")
        assert forwarded["rcpts"] == [f"dave@{REMOTE}"]
        assert "multipart/mixed" in forwarded["headers"]
        assert forwarded["size"] > len(attachment)
        page.click("#back-button")
        row.click()
        expect(page.locator("#reader-subject")).to_have_text(subject)

        # flag it (the "s" key), seen on the server
        page.locator("#reader-subject").focus()
        page.keyboard.press("s")
        expect(page.locator("#flag-button")).to_have_attribute("aria-pressed", "true")
        wait_until(
            lambda: any(
                e["keywords"].get("$flagged") and "inbox" in e["roles"]
                for e in emails_with_subject(webmail, subject)
            )
        )

        # mark it unread again (the "u" key): back in the list, bold, on the server too
        page.keyboard.press("u")
        expect(page.locator("#reader")).to_be_hidden()
        expect(row).to_have_class("row unread flagged")
        wait_until(
            lambda: any(
                "$seen" not in e["keywords"] and "inbox" in e["roles"]
                for e in emails_with_subject(webmail, subject)
            )
        )

        # search: by a word of the body, and for nothing
        page.fill("#search-input", "figures")
        page.press("#search-input", "Enter")
        expect(page.locator("#list-title")).to_have_text("Search: figures")
        expect(rows.filter(has_text=subject)).not_to_have_count(0)
        page.fill("#search-input", "zyxwvut-nothing")
        page.press("#search-input", "Enter")
        expect(page.locator("#list-status")).to_have_text("No message matches.")

        # move to Trash: gone from the Inbox, there in the Trash, on the server too
        page.locator("#mailbox-list .mailbox", has_text="Inbox").click()
        row.click()
        expect(page.locator("#reader-subject")).to_have_text(subject)
        page.click("#trash-button")
        expect(page.locator("#status")).to_have_text("Moved to Trash.")
        expect(rows.filter(has_text=subject)).to_have_count(0)
        received = [e for e in emails_with_subject(webmail, subject) if "sent" not in e["roles"]]
        assert [e["roles"] for e in received] == [{"trash"}]
        page.locator("#mailbox-list .mailbox", has_text="Trash").click()
        expect(rows.filter(has_text=subject)).to_have_count(1)
        assert [line for line in console if "Uncaught" in line or "TypeError" in line] == []
    finally:
        print("the browser's console:", *console, sep="\n")  # shown when the test fails
        context.close()


def test_the_list_pages_on_scroll_and_keys(webmail: Webmail, browser: Any) -> None:
    """60 messages: the first page is 50 rows; scrolling to the end loads the rest by
    Email/query position, each once; the keyboard walks the list and opens a message."""
    from playwright.sync_api import expect

    user = f"carol@{DOMAIN}"
    UsersFile(webmail.server.data_dir / "users").add(user, PASSWORD)
    with smtplib.SMTP("127.0.0.1", webmail.server.ports["mx"], timeout=30) as smtp:
        for n in range(60):
            message = EmailMessage()
            message["From"] = SENDER
            message["To"] = user
            message["Subject"] = f"Report {n:02d}"
            message["Date"] = f"Tue, 01 Dec 2026 10:{n:02d}:00 +0000"
            message.set_content(f"Report number {n}.")
            smtp.send_message(message, SENDER, [user])
            time.sleep(0.02)  # distinct arrival times: the list is sorted by receivedAt
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15000)
    try:
        sign_in(page, webmail, user)
        subjects = page.locator("#message-list li.row .subject")
        expect(page.locator("#list-status")).to_contain_text("of 60", timeout=20000)
        expect(subjects).to_have_count(50)
        page.locator("#list-end").scroll_into_view_if_needed()
        expect(subjects).to_have_count(60)
        expect(page.locator("#list-status")).to_have_text("60 messages.")
        # each once (arrivals within one second may tie on receivedAt: no order among them)
        shown = subjects.all_inner_texts()
        assert sorted(shown) == [f"Report {n:02d}" for n in range(60)]
        assert shown[0] > shown[-1]  # newest first: 59 arrived seconds after 00

        # the keyboard: Home, then arrows and j/k move the focus; Enter opens
        page.locator("#message-list li.row").first.focus()
        page.keyboard.press("End")
        expect(page.locator("#message-list li.row").last).to_be_focused()
        page.keyboard.press("Home")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("j")
        page.keyboard.press("k")
        page.keyboard.press("Enter")
        expect(page.locator("#reader-subject")).to_have_text(shown[1])
        page.keyboard.press("Escape")
        expect(page.locator("#message-list li.row").nth(1)).to_be_focused()
    finally:
        context.close()
