"""Peers for the side-by-side benchmarks: a private Postfix, smtp-sink, and tachymail itself.

Each runs on 127.0.0.1 at a high port, is started by the benchmark and stopped
by its PID. CPU time is read from /proc for the whole process tree (children
that exited count through their parent's cutime/cstime).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# Every benchmark imports this module: a SIGTERM (a timeout, a kill of the run) then unwinds
# like Ctrl-C, through the ``finally`` blocks that stop Postfix, Dovecot and the servers the
# benchmark started, instead of leaving them running on their ports.
signal.signal(signal.SIGTERM, _interrupted)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of *root* and all its descendants, including reaped children."""
    tree = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # utime, stime, cutime, cstime are fields 14-17 of stat (11-14 after the comm field)
        total += sum(int(x) for x in fields[11:15])
        stack.extend(tree.get(pid, []))
    return total / CLK_TCK


@dataclass
class Peer:
    """A server under test: what to call it, where it listens, the PID that owns its tree."""

    name: str
    port: int
    pid: int
    proc: subprocess.Popen[bytes] | None = None
    #: a directory of the peer's own, removed when it stops
    home: Path | None = None

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid)

    def stop(self) -> None:
        """Stop by PID (never by name), also a daemon that is not our child; remove home."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        else:
            _stop_by_pid(self.pid)
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)


def start_tachymail(
    workdir: Path, workers: int | None = None, extra_args: list[str] | None = None, config: str = ""
) -> Peer:
    """tachymail with --hold, or, with *config* (TOML, e.g. a smarthost), delivering.

    *workers* None keeps tachymail's default: one SMTP worker per core, less the delivery
    workers when delivering.
    """
    port = free_port()
    data = workdir / "tachymail-data"
    binary = Path(sys.executable).with_name("tachymail")
    mode = ["--hold"]
    if config:
        (workdir / "tachymail.toml").write_text(config)
        mode = ["-c", str(workdir / "tachymail.toml")]
    if "[metrics]" not in config:  # no endpoint: the default port may be another instance's
        mode += ["--metrics", ""]
    log = open(workdir / "tachymail.log", "ab")  # noqa: SIM115 - kept open by the child
    proc = subprocess.Popen(
        [
            str(binary),
            "--log-level",
            "WARNING",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data),
            *(["--workers", str(workers)] if workers else []),
            *mode,
            *(extra_args or []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    wait_port(port)
    return Peer("tachymail", port, proc.pid, proc=proc)


def start_smtp_sink(workdir: Path, counters: Path | None = None) -> Peer:
    """smtp-sink on a free port; with *counters*, its running counters go to that file."""
    port = free_port()
    # As root smtp-sink must be told whose privileges to drop to.
    user = ["-u", "postfix"] if os.geteuid() == 0 else []
    out = open(counters, "wb") if counters else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [SMTP_SINK, *user, *(["-c"] if counters else []), f"127.0.0.1:{port}", "1024"],
        stdout=out,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_port(port)
    return Peer("smtp-sink", port, proc.pid, proc=proc)


# Every daemon a relaying or deferring Postfix needs, none chrooted (a chroot would need copies
# of /etc files in the queue directory); fields: service type private unpriv chroot wakeup
# maxproc command. The smtpd line is written with the instance's own address.
POSTFIX_SERVICES = """\
pickup     unix      n - n 60    1 pickup
cleanup    unix      n - n -     0 cleanup
qmgr       unix      n - n 300   1 qmgr
tlsmgr     unix      - - n 1000? 1 tlsmgr
rewrite    unix      - - n -     - trivial-rewrite
bounce     unix      - - n -     0 bounce
defer      unix      - - n -     0 bounce
trace      unix      - - n -     0 bounce
verify     unix      - - n -     1 verify
flush      unix      n - n 1000? 0 flush
proxymap   unix      - - n -     - proxymap
proxywrite unix      - - n -     1 proxymap
smtp       unix      - - n -     - smtp
relay      unix      - - n -     - smtp
showq      unix      n - n -     - showq
error      unix      - - n -     - error
retry      unix      - - n -     - error
discard    unix      - - n -     - discard
local      unix      - n n -     - local
virtual    unix      - n n -     - virtual
lmtp       unix      - - n -     - lmtp
anvil      unix      - - n -     1 anvil
scache     unix      - - n -     1 scache
postlog    unix-dgram n - n -    1 postlogd
"""


#: the system user that owns the virtual(8) Maildirs (as Dovecot's in tests/dovecot.py)
VIRTUAL_MAIL_USER = "mail"


def write_postfix_config(
    home: Path,
    port: int,
    process_limit: int = 200,
    relay_to: int = 0,
    virtual_users: Sequence[str] = (),
    lmtp_to: int = 0,
    lmtp_domains: Sequence[str] = (),
) -> Path:
    """Write a complete private Postfix configuration under *home*; returns its etc directory.

    Nothing is read from the machine's /etc/postfix: main.cf and master.cf are written
    whole, the queue and data directories live in *home*, and the only listener is smtpd
    on 127.0.0.1:*port*. Without *relay_to* the instance accepts and defers all delivery
    (the twin of tachymail --hold); with it, it relays everything to 127.0.0.1:relay_to.
    With *virtual_users* (addresses), their domains are virtual mailbox domains: virtual(8)
    delivers each user's mail into the Maildir :func:`postfix_maildir` names (owned by
    VIRTUAL_MAIL_USER), other recipients there get 550 5.1.1 at RCPT, and nothing is relayed.
    With *lmtp_to*, mail for *lmtp_domains* (any address: the LMTP server decides) is handed
    to 127.0.0.1:lmtp_to over LMTP (virtual_transport), and nothing is relayed.
    """
    if lmtp_to:
        delivery = (
            "relayhost =\n"
            "# every address of these domains goes to the LMTP server, which refuses unknowns\n"
            f"virtual_mailbox_domains = {', '.join(lmtp_domains)}\n"
            "virtual_mailbox_maps =\n"
            f"virtual_transport = lmtp:inet:127.0.0.1:{lmtp_to}\n"
            "defer_transports = smtp, relay, local, error\n"
        )
    elif virtual_users:
        delivery = _write_virtual_maps(home, virtual_users)
    elif relay_to:
        delivery = (
            f"# relay everything to the sink, over cached connections\n"
            f"relayhost = [127.0.0.1]:{relay_to}\n"
            f"smtp_tls_security_level = none\n"
        )
    else:
        delivery = (
            "relayhost =\n"
            "# accept and queue, deliver nothing: the twin of tachymail --hold\n"
            "defer_transports = smtp, relay, local, virtual, error, lmtp\n"
        )
    etc, spool, data = home / "etc", home / "spool", home / "data"
    for d in (etc, spool, data):
        d.mkdir(parents=True, exist_ok=True)
    shutil.chown(data, "postfix", "postfix")
    (etc / "main.cf").write_text(
        f"""compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.localdomain
mydomain = localdomain
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
{delivery}default_process_limit = {process_limit}
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP
"""
    )
    (etc / "master.cf").write_text(f"127.0.0.1:{port} inet n - n - - smtpd\n{POSTFIX_SERVICES}")
    return etc


def _write_virtual_maps(home: Path, users: Sequence[str]) -> str:
    """The virtual(8) part of main.cf; writes the mailbox map and makes the Maildir base."""
    import pwd

    entry = pwd.getpwnam(VIRTUAL_MAIL_USER)
    base = home / "vmail"
    base.mkdir(parents=True, exist_ok=True)
    os.chown(base, entry.pw_uid, entry.pw_gid)
    (home / "etc").mkdir(parents=True, exist_ok=True)
    vmailbox = home / "etc" / "vmailbox"
    # "domain/local/": the trailing slash makes virtual(8) write a Maildir
    vmailbox.write_text(
        "".join(f"{user} {user.rpartition('@')[2]}/{user.rpartition('@')[0]}/\n" for user in users)
    )
    domains = sorted({user.rpartition("@")[2] for user in users})
    return (
        "relayhost =\n"
        "# deliver the virtual domains' mail into Maildirs, relay nothing\n"
        f"virtual_mailbox_domains = {', '.join(domains)}\n"
        f"virtual_mailbox_maps = texthash:{vmailbox}\n"
        f"virtual_mailbox_base = {base}\n"
        f"virtual_uid_maps = static:{entry.pw_uid}\n"
        f"virtual_gid_maps = static:{entry.pw_gid}\n"
        f"virtual_minimum_uid = {entry.pw_uid}\n"
        "defer_transports = smtp, relay, local, error, lmtp\n"
    )


def postfix_maildir(peer: Peer, address: str) -> Path:
    """The Maildir virtual(8) delivers *address*'s mail to, in a peer started with
    ``start_postfix(..., virtual_users=...)`` (new messages land in its new/)."""
    assert peer.home is not None
    local, _, domain = address.rpartition("@")
    return peer.home / "vmail" / domain / local


def _stop_by_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM *pid* (Postfix's master stops its daemons on it) and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_postfix(
    workdir: Path,
    process_limit: int = 200,
    relay_to: int = 0,
    virtual_users: Sequence[str] = (),
    lmtp_to: int = 0,
    lmtp_domains: Sequence[str] = (),
) -> Peer:
    """A private Postfix on a free loopback port, configured by :func:`write_postfix_config`.

    Needs root (Postfix drops privileges to its own user, as in production). If it does not
    come up, whatever it started is stopped by PID before the error is raised. *workdir* is
    not used (see below): it keeps the signature the benchmarks share with the other peers.
    """
    port = free_port()
    # Postfix's daemons run as the postfix user, which must reach the queue: the instance
    # lives in a directory of its own in /tmp (a test's tmp_path is private to root; tried:
    # "mail system startup failed"), removed when the peer stops or fails to start.
    home = Path(tempfile.mkdtemp(prefix="tachymail-postfix-"))
    home.chmod(0o755)
    etc = write_postfix_config(
        home, port, process_limit, relay_to, virtual_users, lmtp_to, lmtp_domains
    )
    env = {**os.environ, "MAIL_CONFIG": str(etc)}
    pid_file = home / "spool" / "pid" / "master.pid"
    try:
        started = subprocess.run(
            [POSTFIX, "-c", str(etc), "start"], capture_output=True, text=True, env=env, timeout=60
        )
        if started.returncode != 0:
            raise RuntimeError(f"postfix did not start: {started.stderr}")
        wait_port(port)
        pid = int(pid_file.read_text().split()[0])
    except BaseException:
        if pid_file.exists():
            _stop_by_pid(int(pid_file.read_text().split()[0]))
        shutil.rmtree(home, ignore_errors=True)
        raise
    return Peer("postfix", port, pid, home=home)


def postfix_available() -> str | None:
    """None when Postfix can be run here, else why not."""
    if not (Path(POSTFIX).exists() and Path(SMTP_SOURCE).exists()):
        return "postfix is not installed (./dev test installs it as root)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    return None


def smtp_source(
    port: int, messages: int, sessions: int, size: int, reuse: bool = True, timeout: float = 600
) -> float:
    """Run smtp-source against 127.0.0.1:port; returns the wall time in seconds."""
    cmd = [
        SMTP_SOURCE,
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        "bench@example.com",
        "-t",
        "sink@example.net",
    ]
    if reuse:
        cmd.append("-d")  # smtp-source's -d: don't disconnect, send the next message on it
    cmd.append(f"127.0.0.1:{port}")
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if out.returncode != 0 or out.stderr.strip():
        raise RuntimeError(f"smtp-source failed: {out.stderr.strip()[:500]}")
    return elapsed


def sink_counters(path: Path) -> dict[str, int]:
    """The last "sess=.. quit=.. mesg=.." line smtp-sink -c wrote."""
    text = path.read_bytes().decode(errors="replace").replace("\r", "\n").strip()
    last = text.rsplit("\n", 1)[-1] if text else ""
    fields = dict(item.split("=", 1) for item in last.split() if "=" in item)
    return {k: int(v) for k, v in fields.items() if v.isdigit()}
