"""A metrics port that is taken stops the start, as a taken SMTP port does (issue 17, defect 6)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import free_port, tachymail_cmd, write_config


def test_a_taken_metrics_port_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        smtp = free_port()
        config = tmp_path / "tachymail.toml"
        write_config(
            config, tmp_path / "data", {"mx": smtp}, f'[metrics]\naddress = "127.0.0.1:{taken}"\n'
        )
        proc = subprocess.Popen(
            [*tachymail_cmd(), "serve", "-c", str(config), "--workers", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            # A generous timeout that only catches a server that runs on regardless.
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:  # it ran on: stop it (by PID) and its workers
                proc.terminate()
                proc.wait(30)
    assert proc.returncode == 1, out
    assert f"cannot listen on 127.0.0.1:{taken} (metrics)" in out
    assert "started smtp worker" not in out
