"""A private Dovecot for tests and benchmarks: LMTP, POP3 and IMAP on loopback high ports.

Start one, deliver to it, read from it::

    with running_dovecot({"alice@example.test": "secret"}) as dovecot:
        with smtplib.LMTP("127.0.0.1", dovecot.ports["lmtp"]) as lmtp:
            lmtp.sendmail("bob@example.com", ["alice@example.test"], message)
        pop = poplib.POP3("127.0.0.1", dovecot.ports["pop3"])
        ...
        files = list((dovecot.maildir("alice@example.test") / "new").iterdir())

and open any Maildir (e.g. one ``tachymail mailbox export`` wrote) with Dovecot's own
Maildir code, no server needed::

    for message in read_maildir(export_dir):     # [DovecotMessage(mailbox, uid, flags, content)]
        ...

What callers may rely on:

- Everything is Debian's Dovecot 2.3 (dovecot-core, -lmtpd, -pop3d, -imapd), configured by one
  file this module writes; nothing is read from /etc/dovecot. base_dir, state_dir, the log
  (``DovecotServer.log()``), the users file and the Maildirs live in a private directory under
  /tmp (Dovecot's unprivileged processes must reach it, and a pytest tmp_path is private to
  root), removed when the server stops.
- Listeners: LMTP, POP3 and IMAP on free 127.0.0.1 ports (``ports["lmtp"|"pop3"|"imap"]``),
  no TLS; plaintext logins are allowed (loopback only). Users and their plaintext passwords
  come from a passwd-file; an unknown LMTP recipient gets ``550 5.1.1``. ``+`` is the
  recipient delimiter (``alice+tag@`` delivers to alice's INBOX).
- Mail is stored as ``maildir:~/Maildir`` (Maildir++ layout, ``/`` as the hierarchy separator
  seen by clients), owned by the system user ``mail`` (Dovecot refuses mail access as root),
  with Dovecot's default ``mail_fsync = optimized``: a saved message is fsynced before its
  LMTP 250, as Tachymail's store is before its own. Files hold LF line ends (Dovecot's
  Maildir convention; the ``,W=`` part of the name is the CRLF size).
- The master runs in the foreground as the child of the caller (``dovecot -F``), in a session
  of its own; ``stop()`` sends SIGTERM to its PID (also the PID of base_dir/master.pid), then
  SIGKILL to it if it has not exited in 20 s, and to any service process left in its process
  group. ``running_dovecot`` stops it also when the block raises.
- Needs root (Dovecot's master drops privileges per service); ``require_dovecot()`` skips
  the test otherwise, which TACHYMAIL_REQUIRE_ALL=1 (CI) turns into a failure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DOVECOT = Path("/usr/sbin/dovecot")
DOVEADM = Path("/usr/bin/doveadm")
#: the service binaries each protocol needs (Debian packages dovecot-lmtpd/-pop3d/-imapd)
SERVICES = {
    "lmtp": Path("/usr/lib/dovecot/lmtp"),
    "pop3": Path("/usr/lib/dovecot/pop3"),
    "imap": Path("/usr/lib/dovecot/imap"),
}
#: the system user that owns the Maildirs (Dovecot will not access mail as root)
MAIL_USER = "mail"


def dovecot_unavailable() -> str | None:
    """None when a private Dovecot can run here, else why not."""
    missing = [str(p) for p in (DOVECOT, DOVEADM, *SERVICES.values()) if not p.exists()]
    if missing:
        return (
            f"Dovecot is not installed ({', '.join(missing)} missing; Debian packages "
            "dovecot-core, dovecot-lmtpd, dovecot-pop3d, dovecot-imapd; ./dev test installs them)"
        )
    if os.geteuid() != 0:
        return "a private Dovecot needs root (its master drops privileges per service)"
    try:
        pwd.getpwnam(MAIL_USER)
    except KeyError:
        return f"the system user {MAIL_USER!r} that owns Dovecot's Maildirs does not exist"
    return None


def require_dovecot() -> None:
    """Skip the calling test when Dovecot cannot run here (a failure under CI)."""
    why = dovecot_unavailable()
    if why:
        import pytest

        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dovecot exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"dovecot is not listening on 127.0.0.1:{port}")


def _mail_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), uid, gid, follow_symlinks=False)


def _group_members(pgid: int) -> list[int]:
    """PIDs of the processes in process group *pgid* (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            # state and pgrp, the 3rd and 5th fields of stat; a zombie is already dead
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def write_dovecot_config(
    home: Path, ports: Mapping[str, int], users_file: Path, extra: str = ""
) -> Path:
    """Write a complete Dovecot configuration for an instance living in *home*; its path.

    *ports*: "lmtp", "pop3", "imap" (each on 127.0.0.1). *extra* is appended verbatim (a
    later setting overrides an earlier one, e.g. ``mail_fsync = never``).
    """
    uid, gid = _mail_ids()
    mail_root = home / "mail"
    config = home / "dovecot.conf"
    config.write_text(
        f"""# written by tests/dovecot.py: a private instance, nothing read from /etc/dovecot
base_dir = {home}/run
state_dir = {home}/state
log_path = {home}/dovecot.log
instance_name = tachymail-dovecot-{ports["lmtp"]}
hostname = dovecot.test
postmaster_address = postmaster@dovecot.test
protocols = lmtp pop3 imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {uid}
first_valid_gid = {gid}
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:~/Maildir
recipient_delimiter = +
lmtp_save_to_detail_mailbox = no
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users_file}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users_file}
  default_fields = uid={uid} gid={gid} home={mail_root}/%u
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {ports["lmtp"]}
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {ports["pop3"]}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {ports["imap"]}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{extra}
"""
    )
    return config


@dataclass
class DovecotServer:
    """A running private Dovecot: ports by protocol, its users, where their mail is."""

    home: Path
    config_path: Path
    ports: dict[str, int]
    users: dict[str, str]
    proc: subprocess.Popen[bytes]
    #: Maildirs live at mail_root/<user>/Maildir
    mail_root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.mail_root = self.home / "mail"

    @property
    def pid(self) -> int:
        """The master's PID (the one in base_dir/master.pid)."""
        return self.proc.pid

    def maildir(self, user: str) -> Path:
        """*user*'s Maildir (INBOX: new/, cur/, tmp/; folders as .Name); exists after the
        first delivery or login."""
        return self.mail_root / user / "Maildir"

    def log(self) -> str:
        path = self.home / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def doveadm(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """Run ``doveadm -c CONFIG ARGS`` against this instance (``-u USER`` commands look the
        user up through its auth server); raises on a non-zero exit."""
        return subprocess.run(
            [str(DOVEADM), "-c", str(self.config_path), *args],
            capture_output=True,
            timeout=timeout,
            check=True,
        )

    def stop(self, timeout: float = 20.0) -> None:
        """Stop by PID: SIGTERM to the master; after *timeout*, SIGKILL to it and to every
        process left in its process group; then remove the instance's directory."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            # services that outlived a killed master are still in its group (its PID)
            for pid in _group_members(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.home, ignore_errors=True)


def start_dovecot(
    users: Mapping[str, str] | None = None, extra: str = "", timeout: float = 30.0
) -> DovecotServer:
    """Start a private Dovecot (see the module docstring); the caller must ``stop()`` it.

    *users*: address -> plaintext password (default: alice@example.test / secret).
    If it does not come up, whatever it started is stopped and the error carries its log.
    """
    users = dict(users or {"alice@example.test": "secret"})
    for name, password in users.items():
        if any(c in name + password for c in ":\n"):  # the passwd-file's separators
            raise ValueError(f"user {name!r}: no ':' or newline in names and passwords")
    uid, gid = _mail_ids()
    home = Path(tempfile.mkdtemp(prefix="tachymail-dovecot-"))
    home.chmod(0o755)  # Dovecot's auth process (user dovecot) reads the users file in here
    for sub in ("run", "state"):
        (home / sub).mkdir()
    (home / "mail").mkdir()
    os.chown(home / "mail", uid, gid)
    users_file = home / "users"
    # passwd-file: user:password:uid:gid:gecos:home:shell:extra (uid/gid/home from defaults)
    users_file.write_text("".join(f"{name}:{{PLAIN}}{pw}::::::\n" for name, pw in users.items()))
    users_file.chmod(0o644)
    ports = {"lmtp": _free_port(), "pop3": _free_port(), "imap": _free_port()}
    config = write_dovecot_config(home, ports, users_file, extra)
    out = open(home / "master.out", "ab")  # noqa: SIM115 - the master writes to it until stopped
    proc = subprocess.Popen(
        [str(DOVECOT), "-F", "-c", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    server = DovecotServer(home, config, ports, users, proc)
    try:
        for port in ports.values():
            _wait_port(port, proc, timeout)
    except (RuntimeError, TimeoutError) as exc:
        text = server.log() + (home / "master.out").read_text(errors="replace")
        server.stop()
        raise RuntimeError(f"dovecot did not start ({exc}):\n{text}") from None
    return server


@contextlib.contextmanager
def running_dovecot(
    users: Mapping[str, str] | None = None, extra: str = ""
) -> Iterator[DovecotServer]:
    """A private Dovecot for the block (skips the test if it cannot run); stopped by PID."""
    require_dovecot()
    server = start_dovecot(users, extra)
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class DovecotMessage:
    """One message as Dovecot reads it from a Maildir."""

    #: mailbox name as an IMAP client sees it ("INBOX", "Sent", "Archive/2024")
    mailbox: str
    #: the UID Dovecot assigned (1, 2, ... in the order it found the files)
    uid: int
    #: system flags from the file names' ":2,..." info (\\Seen, \\Answered, ...), no \\Recent
    flags: frozenset[str]
    #: the message's bytes, exactly as stored in the file
    content: bytes


def read_maildir(maildir: Path, timeout: float = 60) -> list[DovecotMessage]:
    """Open *maildir* (a Maildir++ root: new/ cur/ tmp/, folders as .Name) with Dovecot and
    return every message of every mailbox, mailbox by mailbox in Dovecot's order, by UID.

    *maildir* is not modified: Dovecot reads a copy (owned by the ``mail`` user, since it
    refuses to access mail as root, and so that its index files and new/ -> cur/ moves
    stay out of the caller's directory). Runs doveadm standalone: no server is needed.
    A Maildir Dovecot cannot read raises ``subprocess.CalledProcessError`` with its error.
    """
    require_dovecot()
    uid, gid = _mail_ids()
    work = Path(tempfile.mkdtemp(prefix="tachymail-maildir-"))
    try:
        work.chmod(0o755)
        copy = work / "Maildir"
        shutil.copytree(maildir, copy, symlinks=True)
        _chown_tree(copy, uid, gid)
        config = work / "dovecot.conf"
        # standalone doveadm: USER set and no -u means no userdb lookup, so no auth server
        config.write_text(
            f"base_dir = {work}/run\nstate_dir = {work}/state\nlog_path = {work}/dovecot.log\n"
            f"mail_location = maildir:{copy}\nmail_uid = {uid}\nmail_gid = {gid}\n"
            f"first_valid_uid = {uid}\nfirst_valid_gid = {gid}\n"
            "namespace inbox {\n  inbox = yes\n  separator = /\n}\n"
        )
        env = {**os.environ, "USER": "maildir-reader", "HOME": str(work)}
        base = [str(DOVEADM), "-c", str(config)]

        def doveadm(*args: str) -> bytes:
            done = subprocess.run(
                [*base, *args], capture_output=True, env=env, timeout=timeout, check=True
            )
            return done.stdout

        listing = doveadm("-f", "tab", "fetch", "mailbox uid flags", "all").decode()
        messages = []
        for row in listing.splitlines()[1:]:  # the first line names the columns
            if not row:
                continue
            mailbox, uid_text, flags = row.split("\t")
            text = doveadm("fetch", "text", "mailbox", mailbox, "uid", uid_text)
            messages.append(
                DovecotMessage(
                    mailbox=mailbox,
                    uid=int(uid_text),
                    flags=frozenset(flags.split()) - {"\\Recent"},
                    content=text.removeprefix(b"text:\n"),
                )
            )
        return messages
    finally:
        shutil.rmtree(work, ignore_errors=True)
