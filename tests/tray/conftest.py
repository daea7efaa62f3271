"""What the tray tests share: waiting for a condition, a real X server, a desktop's D-Bus side."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from tests.conftest import REPO

if TYPE_CHECKING:  # jeepney is optional: the fixture skips without it
    from tests.tray.desktop_bus import NotificationServer, Panel, Watcher

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """The predicate's first truthy value; fails after `timeout` seconds (no fixed sleeps).
    A loaded machine (CI beside other jobs) can be slow to start X, D-Bus or a daemon: every
    wait gets at least a minute, which costs a passing run nothing."""
    timeout = max(timeout, 60.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def xvfb(size: str = "640x120x24") -> Iterator[str]:
    """A real X server on a free display number; yields DISPLAY."""
    number = next(n for n in range(90, 300) if not Path(f"/tmp/.X11-unix/X{n}").exists()
                  and not Path(f"/tmp/.X{n}-lock").exists())
    process = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", size, "-nolisten", "tcp"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: Path(f"/tmp/.X11-unix/X{number}").exists(), 10, "Xvfb")
        yield f":{number}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Desktop:
    """Xvfb for GTK, a private session bus, a panel's StatusNotifierWatcher, a notification
    server, and the panel's view of the items."""

    display: str
    bus: str
    watcher: Watcher
    notifications: NotificationServer
    panel: Panel
    runtime_dir: Path

    def env(self) -> dict[str, str]:
        """A child's environment in this desktop and no other."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("WAYLAND_DISPLAY", "XDG_CURRENT_DESKTOP", "PYSTRAY_BACKEND")}
        # No accessibility bus, no dconf: GTK would look for both on the session bus. A runtime
        # folder of its own: `systemctl --user` must not find this machine's user manager, or
        # the tray's Start/Stop would drive a real appliance.service.
        return {**env, "DISPLAY": self.display, "DBUS_SESSION_BUS_ADDRESS": self.bus,
                "XDG_RUNTIME_DIR": str(self.runtime_dir), "NO_AT_BRIDGE": "1",
                "GSETTINGS_BACKEND": "memory"}


def desktop_missing() -> str | None:
    if not shutil.which("Xvfb"):
        return "needs Xvfb (tests/run installs it)"
    if not shutil.which("dbus-daemon"):
        return "needs dbus-daemon (tests/run installs the dbus package)"
    try:
        import jeepney  # noqa: F401
    except ImportError:
        return "needs jeepney (the dev extra)"
    return None


@pytest.fixture()
def desktop(tmp_path: Path) -> Iterator[Desktop]:
    missing = desktop_missing()
    if missing:
        pytest.skip(missing)
    from tests.tray.desktop_bus import NotificationServer, Panel, Watcher, session_bus

    folder, runtime = tmp_path / "bus", tmp_path / "runtime"
    folder.mkdir()
    runtime.mkdir(mode=0o700)
    with xvfb() as display, session_bus(folder) as bus:
        watcher, notifications = Watcher(bus), NotificationServer(bus)
        watcher.start()
        notifications.start()
        panel = Panel(bus)
        try:
            yield Desktop(display, bus, watcher, notifications, panel, runtime)
        finally:
            panel.close()
            watcher.close()
            notifications.close()


@pytest.fixture(scope="session")
def appindicator_python() -> str:
    """This venv's Python with what the AppIndicator backend needs, made so by
    installer/tray-deps.sh exactly as the installer does it; skips where the system lacks it."""
    def check() -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
        return subprocess.run([sys.executable, "-m", "appliance.tray.backend"], env=env,
                              capture_output=True, text=True, cwd=REPO, timeout=60)

    result = check()
    if result.returncode != 0:
        if sys.prefix == sys.base_prefix:
            pytest.skip("not in a virtual environment: installer/tray-deps.sh needs one")
        subprocess.run([str(REPO / "installer/tray-deps.sh"), sys.prefix, "--no-build"],
                       capture_output=True, text=True, timeout=120)
        result = check()
    if result.returncode != 0:
        pytest.skip(f"the AppIndicator backend cannot run here: {result.stdout.strip()} "
                    "(tests/run installs python3-gi and gir1.2-ayatanaappindicator3-0.1)")
    return sys.executable
