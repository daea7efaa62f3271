"""The tray on a real X display (Xvfb) docked in a real tray host (trayer), against a real daemon."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance.conftest import run_daemon
from tests.conftest import MODEL_A, MODEL_B, REPO

pytestmark = pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("trayer") and shutil.which("xwininfo")),
    reason="needs Xvfb, trayer and xwininfo (tests/run installs them)")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture()
def x_display() -> Iterator[str]:
    """Xvfb plus trayer, once trayer owns the system-tray selection."""
    number = next(n for n in range(90, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    display = f":{number}"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "640x120x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "DISPLAY": display}
    wait_for(lambda: Path(f"/tmp/.X11-unix/X{number}").exists(), 10, "Xvfb")
    trayer = subprocess.Popen(["trayer", "--edge", "top", "--align", "right", "--widthtype",
                               "request", "--height", "32", "--transparent", "false",
                               "--tint", "0x203040", "--SetDockType", "true"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import Xlib.display

    x = Xlib.display.Display(display)
    selection = x.intern_atom("_NET_SYSTEM_TRAY_S0")
    # An icon started before the tray host owns the selection never docks.
    wait_for(lambda: x.get_selection_owner(selection) != 0, 10, "trayer's tray selection")
    x.close()
    try:
        yield display
    finally:
        trayer.terminate()
        xvfb.terminate()
        trayer.wait(timeout=10)
        xvfb.wait(timeout=10)


def icon_window(display: str) -> tuple[int, str] | None:
    """(window id, title) of our icon when it is docked inside trayer's panel."""
    import Xlib.display

    x = Xlib.display.Display(display)
    try:
        def walk(window, inside_panel: bool):
            for child in window.query_tree().children:
                wm_class = child.get_wm_class() or ()
                if inside_panel and "qwen-appliance" in wm_class:
                    name = child.get_full_property(x.intern_atom("WM_NAME"), 0)
                    return child.id, name.value.decode("latin-1") if name else ""
                found = walk(child, inside_panel or "trayer" in wm_class)
                if found:
                    return found
            return None

        return walk(x.screen().root, False)
    finally:
        x.close()


def screenshot(display: str, path: Path) -> None:
    import Xlib.display
    import Xlib.X
    from PIL import Image

    x = Xlib.display.Display(display)
    root = x.screen().root
    raw = root.get_image(560, 0, 80, 34, Xlib.X.ZPixmap, 0xFFFFFFFF)
    Image.frombytes("RGB", (80, 34), raw.data, "raw", "BGRX").resize(
        (320, 136), Image.NEAREST).save(path)
    x.close()


def test_tray_docks_switches_and_shows_the_daemon_stopping(
        x_display: str, models_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", x_display)
    from appliance.client import DaemonClient
    from appliance.tray.app import TrayApp
    from appliance.tray.service import DaemonControl
    from appliance.tray.snapshot import TrayState

    with run_daemon(models_dir, tmp_path, default_model=MODEL_A) as daemon:
        client = DaemonClient(daemon.url)
        app = TrayApp(client, DaemonControl(), poll_s=0.5)
        runner = threading.Thread(target=app.run, daemon=True)
        runner.start()
        try:
            wait_for(lambda: icon_window(x_display), 15, "the icon to dock in trayer")
            wait_for(lambda: app.snapshot.state is TrayState.READY, 15, "the ready state")
            assert MODEL_A in icon_window(x_display)[1]

            artifacts = REPO / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            screenshot(x_display, artifacts / "tray-ready.png")

            app.request("switch", MODEL_B)  # exactly what the Models ▸ item's click does
            wait_for(lambda: client.status().get("model", {}) and
                     client.status()["model"]["id"] == MODEL_B, 60, "the daemon to switch")
            wait_for(lambda: MODEL_B in icon_window(x_display)[1], 5, "the title to follow")

            daemon.process.terminate()
            daemon.process.wait(timeout=30)
            stopped_at = time.monotonic()
            wait_for(lambda: "daemon not running" in icon_window(x_display)[1], 3,
                     "the stopped look within 3 s")
            assert app.snapshot.state is TrayState.STOPPED
            assert time.monotonic() - stopped_at < 3
            screenshot(x_display, artifacts / "tray-stopped.png")
        finally:
            app.stop()
            runner.join(timeout=10)
            client.close()
            # pystray's Icon cleans up in __del__: let that run while the X server still exists.
            app._icon = None
            gc.collect()


def test_tray_command_without_display_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "tray"], capture_output=True,
                            text=True, env=env, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no graphical display" in result.stderr
