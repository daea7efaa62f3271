"""Start and stop the daemon: through the systemd user unit when it is installed, else by
spawning `appliance serve` ourselves."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

UNIT = "appliance.service"


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state"
    return Path(base) / "qwen-appliance"


class DaemonControl:
    def __init__(self, serve_env: dict[str, str] | None = None) -> None:
        self.serve_env = serve_env or {}

    def uses_systemd(self) -> bool:
        if shutil.which("systemctl") is None:
            return False
        result = subprocess.run(["systemctl", "--user", "cat", UNIT], capture_output=True,
                                timeout=10)
        return result.returncode == 0

    def start(self) -> str:
        if self.uses_systemd():
            subprocess.run(["systemctl", "--user", "start", UNIT], check=True, timeout=30)
            return "started the appliance service"
        log = _state_dir() / "daemon.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"],
                             env={**os.environ, **self.serve_env}, stdout=out, stderr=out,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        return f"started the daemon (log: {log})"

    def log_file(self) -> Path:
        """A file with the daemon's recent log: the journal's tail, or the log we spawn into."""
        if not self.uses_systemd():
            return _state_dir() / "daemon.log"
        path = _state_dir() / "journal.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            subprocess.run(["journalctl", "--user", "-u", UNIT, "-n", "2000", "--no-pager"],
                           stdout=out, stderr=subprocess.STDOUT, timeout=30)
        return path

    def stop(self, pid: int | None) -> str:
        if self.uses_systemd():
            subprocess.run(["systemctl", "--user", "stop", UNIT], check=True, timeout=60)
            return "stopped the appliance service"
        if pid is None:
            return "the daemon is not running"
        os.kill(pid, signal.SIGTERM)  # the daemon finishes streams, unloads and exits 0
        return "stopping the daemon"
