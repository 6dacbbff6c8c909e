"""One hot destination over several delivery workers: with ``[delivery] workers = 2`` both
workers deliver to the one destination, together within its ``max_connections``, and
every message arrives exactly once.

The destination is tests/smtp_peer.py on loopback; it counts the sessions open at once.
Which worker made each attempt comes from the server's log (the text format carries the
pid, and each delivery worker logs its index and pid when it starts).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import running_server, start, wait_until
from smtp_peer import Script, SmtpPeer

MESSAGES = 200
#: the node's limit; each of the two workers may open half of it
LIMIT = 4


def config(peer_port: int) -> str:
    return (
        f'[[route]]\ndomain = "dest.example"\nhost = "127.0.0.1:{peer_port}"\ntls = "none"\n\n'
        "[delivery]\nworkers = 2\nretry_schedule = [1]\ndelay_warning = 0\n"
        'resolver = "127.0.0.1:9"\n\n'
        f"[pool]\nmax_connections = {LIMIT}\ninitial_connections = {LIMIT}\n"
    )


def test_a_hot_destination_is_served_by_both_delivery_workers(tmp_path: Path) -> None:
    import smtplib

    # A peer slow enough that each worker's pool fills up to its share while a backlog waits.
    script = Script(delay=0.002)
    with SmtpPeer(script) as peer:
        with (
            running_server(tmp_path, config(peer.port), hold=True, roles=("mx",)) as srv,
            smtplib.SMTP("127.0.0.1", srv.ports["mx"]) as client,
        ):
            for i in range(MESSAGES):
                client.sendmail(
                    "alice@sender.example",
                    [f"u{i}@dest.example"],
                    f"Subject: spread {i}\r\n\r\nMessage {i}.\r\n",
                )
        # Start delivering the backlog: both workers find their messages at once.
        srv.config_path.write_text(
            srv.config_path.read_text().replace("hold = true", "hold = false")
        )
        srv = start(srv.config_path, srv.data_dir, srv.ports, 1, tmp_path / "delivering.log")
        try:
            peer.wait_for(MESSAGES, timeout=120)
            wait_until(lambda: srv.queue_count() == 0, timeout=60)
            log = srv.log()
        finally:
            srv.stop()
    got = sorted(rcpt for m in peer.messages for rcpt in m.recipients)
    assert got == sorted(f"u{i}@dest.example" for i in range(MESSAGES)), "each exactly once"
    assert peer.max_open <= LIMIT, f"{peer.max_open} sessions at once, limit {LIMIT}"
    workers = {
        pid: index
        for index, pid in re.findall(r"delivery worker (\d)/2 \(pid (\d+)\) started", log)
    }
    assert set(workers.values()) == {"0", "1"}, log
    delivered_by = {
        workers[pid]
        for pid in re.findall(
            r" (\d+) INFO \S+: \S+ to <u\d+@dest\.example> via .*: delivered", log
        )
        if pid in workers
    }
    assert delivered_by == {"0", "1"}, "both workers deliver to the one destination"
