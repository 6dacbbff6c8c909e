"""Writes the seed inputs of every fuzz target into fuzz/seeds/<target>/ (checked in).

Run it again after changing a harness's input layout: ``python fuzz/seeds.py``.  Seeds are whole
SMTP dialogues and messages wrapped in the harness's control bytes, so the fuzzer starts from
real traffic instead of discovering it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
CRLF = b"\r\n"

HELLO = b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<u@example.org>\r\n"
MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n..leading dot\r\n"
SESSIONS = [
    HELLO + b"DATA\r\n" + MESSAGE + b".\r\nQUIT\r\n",
    HELLO + b"BDAT 10\r\n0123456789BDAT 5 LAST\r\nabcdeQUIT\r\n",
    HELLO + b"DATA\r\nSubject: x\r\n\r\nsmuggled\n.\nMAIL FROM:<evil@example.com>\n.\r\nRSET\r\n",
    b"EHLO x\r\nAUTH PLAIN AHVzZXIAcGFzcw==\r\nAUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\nQUIT\r\n",
    b"EHLO x\r\nAUTH PLAIN AHVzZXIAcGFzcw==\r\n"
    + HELLO[21:]
    + b"DATA\r\nSubject: s\r\n\r\nb\r\n.\r\n",
    b"HELO x\r\nMAIL FROM:<> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<Postmaster>\r\nDATA\r\n.\r\n",
    b"EHLO x\r\nMAIL FROM:<a@b> SMTPUTF8\r\nRCPT TO:<\xc3\xa9@localhost> NOTIFY=NEVER\r\nRSET\r\n",
    b"NOOP\r\nHELP\r\nVRFY x\r\nEXPN y\r\nSTARTTLS\r\nbogus\r\n" + b"x" * 600 + b"\r\nQUIT\r\n",
]
COMMANDS = [
    b"MAIL FROM:<a@example.com> SIZE=1000 BODY=8BITMIME ENVID=a+2Bb\r\n",
    b"RCPT TO:<@a.example,@b.example:u@[IPv6:2001:db8::1]> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;x\r\n",
    b'MAIL FROM:<"quoted local"@[192.0.2.1]> SMTPUTF8 REQUIRETLS\r\n',
    b"RCPT TO:<\xc3\xa9l\xc3\xa8ve@\xc3\xa9cole.example>\r\nEHLO x\nbare\rcr\r\n",
    b"rcpt to:<Postmaster>\r\nMAIL FROM:<>\r\n" + b"A" * 700 + b"\r\n",
]
MESSAGES = [
    MESSAGE + b".\r\n",
    b"line\n.\nnot the end\r\n.\r\n",
    b".\r\n",
    b"a\rb\r\n..\r\n\r\n.\r\n",
]
MIME = [
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\npreamble\r\n--b\r\n'
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nh\xc3\xa9\r\n--b\r\n"
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n"
    b"--b--\r\nepilogue\r\n",
    b"Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: a\n\nx\n--d--\n",
    b'Content-Type: multipart/alternative; boundary*0="a"; boundary*1="b"\n\n--ab\n'
    b"Content-Type: text/html; charset*=iso-8859-1'en'%E9\nContent-Transfer-Encoding: base64\n\n"
    b"aGk=\n--ab--\n",
    b"From sender Tue Dec 1\nSubject: no blank line\nbody starts here\n",
]
IMAP = [
    b'a1 CAPABILITY\r\na2 LOGIN fred "pa ss"\r\na3 SELECT INBOX\r\n'
    b"a4 UID FETCH 1:* (UID FLAGS RFC822.SIZE)\r\n",
    b"a5 FETCH 2,4:7 (FLAGS BODY.PEEK[HEADER.FIELDS (DATE FROM SUBJECT)]<0.2048> BINARY[1.2])"
    b"\r\na6 FETCH 1 ALL\r\n",
    b'a7 UID SEARCH TEXT "hello" SINCE 1-Feb-1994 NOT FROM {5+}\r\nSmith\r\na8 SEARCH $\r\n',
    b"a9 APPEND Drafts (\\Seen \\Draft) {23}\r\nSubject: hi\r\n\r\nHello.\r\n\r\n"
    b"b1 APPEND x ~{2+}\r\n\x00\x01\r\n",
    b'b2 STORE 1:* +FLAGS.SILENT (\\Deleted)\r\nb3 LIST "" [Gmail]/%\r\n* BAD\r\n'
    b"b4 X (unbalanced\r\n" + b"x" * 300 + b"\r\nb5 LOGOUT\r\n",
]


def write(target: str, seeds: list[bytes]) -> None:
    folder = HERE / "seeds" / target
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (folder / hashlib.sha1(seed).hexdigest()[:16]).write_bytes(seed)


def main() -> None:
    # Each harness reads option bytes, then split points (zeros: no split), then the stream.
    write("session", [bytes(4 + 32) + s for s in SESSIONS])
    write("session", [b"\x03" + bytes(3 + 32) + s for s in SESSIONS[3:5]])  # smtps: AUTH
    write("session", [b"\x00\x01\x01" + bytes(1 + 32) + s for s in SESSIONS[:3]])  # trusted
    write("commands", [b"\x00\x01\xff\x00" + bytes(24) + c for c in COMMANDS + SESSIONS[:4]])
    write("data", [bytes(3 + 24) + m for m in MESSAGES])
    write("data", [b"\x02\x00\x00" + MESSAGE])  # dot_stuff round trip
    write("data", [b"\x01\x00\x00\x0a\x00" + MESSAGE[:10] + b"\x05\x01" + MESSAGE[10:15]])
    write("mime", [bytes(2) + m for m in MIME])
    write("imap", [bytes(2 + 24) + c for c in IMAP])
    write("imap", [b"\x03\x02" + bytes(24) + c for c in IMAP[2:4]])  # small limits


if __name__ == "__main__":
    main()
