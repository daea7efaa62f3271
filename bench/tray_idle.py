"""Tray figures: what `appliance tray` costs idling, and how fast it reacts.

    python bench/tray_idle.py MODELS_DIR MODEL_ID [--backend appindicator|xorg] [--seconds 60]
                              [--rounds 5] [--out bench/results/tray_idle-BACKEND.json]

appindicator (GNOME/KDE): Xvfb for GTK, a private D-Bus session with a StatusNotifierWatcher
and a notification server (the ones the tests use, tests/tray/desktop_bus.py), the daemon, and
the tray as a child process. Measured:
- the tray's CPU (percent of one core) and peak RSS while idle against a ready daemon;
- menu action to daemon request: a dbusmenu click ("Unload model", "Switch model ▸ MODEL") to
  the request's first bytes reaching the daemon's port (the tray talks to the daemon through a
  pass-through proxy here that notes when each request arrives);
- daemon state change to icon change: the daemon's process exiting (SIGTERM) to the item's
  IconName changing, and the daemon first answering "ready" to the Title naming the model,
  both watched every 10 ms.
xorg: Xvfb and trayer; only the idle figures (that tray has no menu to click).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.tray.conftest import wait_for, xvfb  # noqa: E402
from tests.tray.desktop_bus import NotificationServer, Panel, Watcher, session_bus  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RequestClock:
    """A pass-through TCP proxy in front of the daemon that notes when each request arrives."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.arrivals: list[tuple[float, bytes]] = []  # (monotonic time, request line)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:  # the daemon is down: refuse, as its port would
            client.close()
            return
        with client, upstream:
            first = client.recv(65536)
            self.arrivals.append((time.monotonic(), first.split(b"\r\n", 1)[0]))
            upstream.sendall(first)

            def pump(src: socket.socket, dst: socket.socket) -> None:
                with contextlib.suppress(OSError):
                    while data := src.recv(65536):
                        dst.sendall(data)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

            back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
            back.start()
            pump(client, upstream)
            back.join(timeout=600)

    def arrival_after(self, start: float, prefix: bytes) -> float | None:
        return next((t for t, line in list(self.arrivals) if t >= start
                     and line.startswith(prefix)), None)

    def close(self) -> None:
        self.server.close()


def time_until(condition: Callable[[], bool], every_s: float, timeout: float = 60) -> float:
    """Seconds until the condition holds, checking every `every_s`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError("the condition did not come true")
        time.sleep(every_s)
    return time.monotonic() - started


def idle_figures(pid: int, seconds: float) -> dict[str, float]:
    process = psutil.Process(pid)
    before = sum(process.cpu_times()[:2])
    started = time.monotonic()
    rss = []
    while time.monotonic() - started < seconds:
        rss.append(process.memory_info().rss)
        time.sleep(1)
    cpu = (sum(process.cpu_times()[:2]) - before) / (time.monotonic() - started) * 100
    return {"tray_cpu_percent_of_one_core": round(cpu, 3),
            "tray_rss_mib_max": round(max(rss) / 2**20, 1)}


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1),
            "n": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("model")
    parser.add_argument("--backend", choices=["appindicator", "xorg"], default="appindicator")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--note", help="conditions worth keeping with the figures")
    args = parser.parse_args()
    out = args.out or REPO / f"bench/results/tray_idle-{args.backend}.json"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    clock = RequestClock(port)
    folder = Path(tempfile.mkdtemp(prefix="tray-bench-"))
    serve_env = {**os.environ, "APPLIANCE_PORT": str(port),
                 "APPLIANCE_MODELS_DIR": str(args.models_dir),
                 "APPLIANCE_DEFAULT_MODEL": args.model, "APPLIANCE_CONFIG": "/nonexistent.toml",
                 "APPLIANCE_LOG_LEVEL": "warning", "APPLIANCE_GPU": "none",
                 "XDG_STATE_HOME": str(folder / "state")}
    procs: list[subprocess.Popen[bytes]] = []
    http = httpx.Client(timeout=5)

    def state() -> str | None:
        try:
            return http.get(url + "/api/status").json()["state"]
        except httpx.TransportError:
            return None

    def start_daemon() -> subprocess.Popen[bytes]:
        daemon = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"],
                                  env=serve_env, cwd=REPO, stderr=subprocess.DEVNULL)
        procs.append(daemon)
        return daemon

    figures: dict[str, Any] = {"backend": args.backend, "seconds": args.seconds,
                               "cpu_count": os.cpu_count(), "model": args.model}
    if args.note:
        figures["note"] = args.note
    with xvfb() as display, session_bus(folder) as bus:
        # The tray reaches the daemon through the clock's proxy.
        env = {**serve_env, "APPLIANCE_PORT": str(clock.port), "DISPLAY": display,
               "DBUS_SESSION_BUS_ADDRESS": bus, "NO_AT_BRIDGE": "1",
               "GSETTINGS_BACKEND": "memory", "PYSTRAY_BACKEND": args.backend}
        watcher = notifications = panel = None
        try:
            if args.backend == "appindicator":
                watcher, notifications = Watcher(bus), NotificationServer(bus)
                watcher.start()
                notifications.start()
                panel = Panel(bus)
            else:
                procs.append(subprocess.Popen(["trayer", "--edge", "top", "--SetDockType",
                                               "true"], env=env, stderr=subprocess.DEVNULL))
            daemon = start_daemon()
            wait_for(lambda: state() == "ready", 120, "the daemon")
            tray = subprocess.Popen([sys.executable, "-m", "appliance.cli", "tray"], env=env,
                                    cwd=REPO, stderr=subprocess.DEVNULL)
            procs.append(tray)
            if watcher is not None and panel is not None:
                item = wait_for(lambda: watcher.items and watcher.items[-1], 30, "the item")
                wait_for(lambda: args.model in panel.prop(item, "Title"), 30, "the title")
            time.sleep(5)  # let start-up work (imports, first renders) finish before sampling
            figures.update(idle_figures(tray.pid, args.seconds))
            if watcher is not None and panel is not None:
                unload, switch, icon, title = [], [], [], []
                for _ in range(args.rounds):
                    clicked = panel.click(item, panel.menu(item).find("Unload model"))
                    unload.append(wait_for(lambda c=clicked: clock.arrival_after(
                        c, b"POST /api/unload"), 10, "the unload request") - clicked)
                    # Click the next one once the unload is done and shown: actions run one
                    # after another, so an earlier click would time the unload too.
                    wait_for(lambda: state() == "unloaded", 30, "the unload")
                    menu = wait_for(lambda: (m := panel.menu(item)).children[2].label
                                    == "No model loaded" and m, 30, "the menu to follow")
                    entry = menu.find("Switch model").find(args.model)
                    clicked = panel.click(item, entry)
                    switch.append(wait_for(lambda c=clicked: clock.arrival_after(
                        c, b"POST /api/models/"), 10, "the load request") - clicked)
                    wait_for(lambda: state() == "ready", 60, "ready")
                for _ in range(args.rounds):
                    before = panel.prop(item, "IconName")
                    daemon.send_signal(signal.SIGTERM)
                    daemon.wait(timeout=60)
                    icon.append(time_until(
                        lambda old=before: panel.prop(item, "IconName") != old, 0.01))
                    wait_for(lambda: "not running" in panel.prop(item, "Title"), 10, "stopped")
                    daemon = start_daemon()
                    seen: dict[str, float] = {}
                    deadline = time.monotonic() + 120
                    while len(seen) < 2:  # both watched in one loop, every 10 ms
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"the daemon or the title did not follow: {seen}")
                        now = time.monotonic()
                        if "ready" not in seen and state() == "ready":
                            seen["ready"] = now
                        if "title" not in seen and f"{args.model} (ready)" in panel.prop(
                                item, "Title"):
                            seen["title"] = now
                        time.sleep(0.01)
                    title.append(seen["title"] - seen["ready"])
                figures["menu_click_to_daemon_request_unload_ms"] = summary(unload)
                figures["menu_click_to_daemon_request_switch_ms"] = summary(switch)
                figures["daemon_exit_to_icon_change_ms"] = summary(icon)
                figures["daemon_ready_to_title_change_ms"] = summary(title)
                figures["notifications"] = [n.summary for n in notifications.received]
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=30)
            for service in (watcher, notifications):
                if service is not None:
                    service.close()
            clock.close()
            http.close()
    text = json.dumps(figures, indent=2)
    print(text)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
