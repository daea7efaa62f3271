"""The tray on a real X display (Xvfb) docked in a real tray host (trayer), against a real daemon:
the X11 fallback, where pystray has an icon and a title but no menu."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.tray.notify import LogNotifier
from appliance.tray.service import DaemonControl
from tests.appliance.conftest import run_daemon
from tests.conftest import MODEL_A, MODEL_B, REPO
from tests.tray.conftest import wait_for, xvfb

needs_trayer = pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("trayer") and shutil.which("xwininfo")),
    reason="needs Xvfb, trayer and xwininfo (tests/run installs them)")


@pytest.fixture()
def x_display(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Xvfb plus trayer, once trayer owns the system-tray selection; the X11 backend forced, as
    a desktop without a StatusNotifierWatcher would choose it."""
    monkeypatch.setenv("PYSTRAY_BACKEND", "xorg")
    with xvfb() as display:
        env = {**os.environ, "DISPLAY": display}
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
            trayer.wait(timeout=10)


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


def title_of_icon(display: str) -> str:
    return (icon_window(display) or (0, ""))[1]


@needs_trayer
def test_tray_docks_switches_and_shows_the_daemon_stopping(
        x_display: str, models_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", x_display)
    from appliance.client import DaemonClient
    from appliance.tray.app import TrayApp
    from appliance.tray.snapshot import TrayState

    with run_daemon(models_dir, tmp_path, default_model=MODEL_A) as daemon:
        client = DaemonClient(daemon.url)
        app = TrayApp(client, DaemonControl(), poll_s=0.5, notifier=LogNotifier())
        runner = threading.Thread(target=app.run, daemon=True)
        runner.start()
        try:
            wait_for(lambda: icon_window(x_display), 15, "the icon to dock in trayer")
            wait_for(lambda: app.snapshot.state is TrayState.READY, 15, "the ready state")
            # The title follows the snapshot on the poll thread: wait for it, not a moment.
            wait_for(lambda: MODEL_A in title_of_icon(x_display), 10, "the title to name the model")

            artifacts = REPO / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            screenshot(x_display, artifacts / "tray-ready.png")

            app.request("switch", MODEL_B)  # exactly what the Models ▸ item's click does
            wait_for(lambda: (m := client.status().get("model")) and m["id"] == MODEL_B, 60,
                         "the daemon to switch")
            wait_for(lambda: MODEL_B in title_of_icon(x_display), 5, "the title to follow")

            daemon.process.terminate()
            daemon.process.wait(timeout=30)
            stopped_at = time.monotonic()
            wait_for(lambda: "daemon not running" in title_of_icon(x_display), 3,
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


class BrokenControl(DaemonControl):
    """A start that fails in a way no action expects (a bug, say)."""

    def start(self) -> str:
        raise RuntimeError("boom in start")


@needs_trayer
def test_an_unexpected_error_in_an_action_is_logged_and_actions_go_on(
        x_display: str, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DISPLAY", x_display)
    from appliance.client import DaemonClient
    from appliance.tray.app import TrayApp

    with run_daemon(models_dir, tmp_path, default_model=MODEL_A) as daemon:
        client = DaemonClient(daemon.url)
        app = TrayApp(client, BrokenControl(), poll_s=0.5, notifier=LogNotifier())
        runner = threading.Thread(target=app.run, daemon=True)
        runner.start()
        try:
            wait_for(lambda: client.status()["state"] == "ready", 30, "the model to load")
            with caplog.at_level(logging.ERROR, logger="appliance.tray.app"):
                app.request("start")
                wait_for(lambda: any("boom in start" in r.getMessage() or
                                     (r.exc_info and "boom in start" in str(r.exc_info[1]))
                                     for r in caplog.records), 10, "the error in the log")
            app.request("unload")  # the same thread must still take actions
            wait_for(lambda: client.status()["state"] == "unloaded", 30,
                     "the next action to run")
            thread = next(t for t in threading.enumerate() if t.name == "tray-actions")
            assert thread.is_alive()
        finally:
            app.stop()
            runner.join(timeout=10)
            app._icon = None
            gc.collect()


def test_a_display_the_backend_cannot_open_is_one_line() -> None:
    """What `appliance tray` turns into its one-line error (exit 2) instead of a traceback."""
    code = ("from appliance.tray.backend import TrayUnavailable, open_backend\n"
            "try:\n    open_backend()\n"
            "except TrayUnavailable as e:\n    print(e)\n    raise SystemExit(3)\n")
    env = {**os.environ, "DISPLAY": ":1999", "PYSTRAY_BACKEND": "xorg"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=60)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("tray: the plain X11 tray") and "PYSTRAY_BACKEND" in result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith("cannot open the display for the xorg tray: ")


def test_logs_are_the_spawned_daemons_log_without_systemd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    control = DaemonControl()
    if control.uses_systemd():
        pytest.skip("a systemd user unit is installed here: the logs are in the journal")
    assert control.log_file() == tmp_path / "qwen-appliance/daemon.log"
