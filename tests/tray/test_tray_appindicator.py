"""`appliance tray` with the AppIndicator backend on a real D-Bus session, as GNOME and KDE run it.

Everything is real: dbus-daemon, Xvfb for GTK, libayatana-appindicator and libdbusmenu in the
tray process, the daemon with tiny models. The desktop's side (the StatusNotifierWatcher a panel
runs, a notification server, the panel reading and clicking the menu) is written in the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.appliance.conftest import FOREVER, Daemon, free_port, run_daemon
from tests.conftest import EMBED, MODEL_A, MODEL_B, REPO
from tests.tray.conftest import Desktop, wait_for

BAD_MODEL = "tiny-badtok"  # a sound file whose tokenizer llama.cpp does not know: loads fail
GREY = (128, 128, 128)  # the stopped frame colour (appliance.tray.icon.STATE_COLOURS)


def unloadable_copy(source: Path, target: Path) -> None:
    """Copy a GGUF with its tokenizer model renamed: the header is fine, llama.cpp's load is not."""
    data = bytearray(source.read_bytes())
    key = b"tokenizer.ggml.model"
    at = data.index(key) + len(key)
    # After the key: the value type (u32 string = 8), the length (u64), the text.
    assert data[at:at + 4] == (8).to_bytes(4, "little")
    length = int.from_bytes(data[at + 4:at + 12], "little")
    start = at + 12
    data[start:start + length] = b"x" * length
    target.write_bytes(bytes(data))


@pytest.fixture()
def tray_models(models_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in (MODEL_A, MODEL_B, "broken"):
        shutil.copy(models_dir / f"{name}.gguf", folder)
    unloadable_copy(models_dir / f"{MODEL_A}.gguf", folder / f"{BAD_MODEL}.gguf")
    return folder


def status(daemon_url: str) -> dict[str, Any] | None:
    try:
        return httpx.get(daemon_url + "/api/status", timeout=5).json()
    except httpx.TransportError:
        return None


def serving(daemon_url: str, model: str) -> bool:
    s = status(daemon_url)
    return bool(s and s["state"] == "ready" and s["model"] and s["model"]["id"] == model)


def frame_colour(path: str) -> tuple[int, ...] | None:
    """The icon's frame colour, read from the file its IconName names (None if replaced)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB").getpixel((image.width // 2, 0))
    except (FileNotFoundError, OSError):
        return None


@pytest.fixture()
def tray(desktop: Desktop, tray_models: Path, tmp_path: Path,
         appindicator_python: str) -> Iterator[tuple[Daemon, subprocess.Popen[bytes], Path]]:
    """A daemon, and `appliance tray` (a child process) watching it in the test's desktop."""
    with tray_for(desktop, tray_models, tmp_path, appindicator_python) as running:
        yield running


@contextlib.contextmanager
def tray_for(desktop: Desktop, folder: Path, tmp_path: Path,
             python: str) -> Iterator[tuple[Daemon, subprocess.Popen[bytes], Path]]:
    with run_daemon(folder, tmp_path, default_model=MODEL_A) as daemon:
        port = daemon.url.rsplit(":", 1)[1]
        # The tray's own settings name the daemon; "Start daemon" spawns one with them.
        env = {**desktop.env(), "APPLIANCE_PORT": port, "APPLIANCE_MODELS_DIR": str(folder),
               "APPLIANCE_CONFIG": str(tmp_path / "absent.toml"), "APPLIANCE_THREADS": "2",
               "APPLIANCE_CONTEXT_LENGTH": "4096", "APPLIANCE_GPU": "none",
               "APPLIANCE_DEFAULT_MODEL": MODEL_A, "XDG_STATE_HOME": str(tmp_path / "state")}
        stderr = tmp_path / "tray.err"
        with stderr.open("wb") as err:
            process = subprocess.Popen([python, "-m", "appliance.cli", "tray"],
                                       env=env, stdout=err, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            yield daemon, process, stderr
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
            # A daemon that "Start daemon" spawned lives in a session of its own.
            spawned = status(daemon.url)
            if spawned:
                os.kill(spawned["pid"], signal.SIGTERM)
                wait_for(lambda: status(daemon.url) is None, 30, "the spawned daemon to stop")


def test_tray_registers_and_its_menu_drives_the_daemon(desktop: Desktop, tray) -> None:
    daemon, process, stderr = tray
    panel, notifications = desktop.panel, desktop.notifications

    item = wait_for(lambda: desktop.watcher.items and desktop.watcher.items[-1], 30,
                    "the item to register with the StatusNotifierWatcher")
    first_line = stderr.read_text().splitlines()[0]
    assert "AppIndicator" in first_line and "StatusNotifierWatcher" in first_line
    title = wait_for(lambda: (t := panel.prop(item, "Title")) and MODEL_A in t and t, 30,
                     "the title to name the model")
    assert "CPU only, RAM" in title and "(daemon " in title  # the memory, and our share of it

    def menu_when(condition, what: str):
        return wait_for(lambda: (m := panel.menu(item)) and condition(m) and m, 15, what)

    menu = menu_when(lambda m: m.labels()[0] == "Ready", "the menu to show the ready state")
    memory, resident = menu.children[1:3]
    assert memory.label.startswith("CPU only, RAM") and not memory.enabled
    assert resident.label.startswith(f"{MODEL_A}: chat, ") and resident.label.endswith(
        " RAM planned, 0/4 busy") and resident.ticked and not resident.enabled
    switch = menu.find("Switch model")
    assert switch.props.get("children-display") == "submenu"
    models = {c.label.split(" ")[0]: c for c in switch.children}
    assert set(models) == {MODEL_A, MODEL_B, BAD_MODEL, "broken"}
    assert models[MODEL_A].ticked and not models[MODEL_B].ticked
    assert not models["broken"].enabled and "unusable" in models["broken"].label
    for label in ("Unload", "Stop daemon", "Open models folder", "Open logs", "Quit tray"):
        assert menu.find(label).enabled, label
    assert not menu.find("Start daemon").enabled

    # Busy and back: the state line changes in place (the same items: no new layout), the
    # memory line too, while a stream runs.
    ids = [c.id for c in menu.children]
    body = {"model": MODEL_A, "prompt": "x", "max_tokens": 4000, "stream": True, **FOREVER}
    with httpx.stream("POST", daemon.url + "/v1/completions", json=body, timeout=60) as running:
        lines = running.iter_lines()  # keep the iterator: dropping it closes the stream
        next(lines)
        busy = menu_when(lambda m: m.labels()[0].startswith("Busy, "), "the busy line")
        assert [c.id for c in busy.children] == ids
    menu = menu_when(lambda m: m.labels()[0] == "Ready", "the ready line again")
    assert [c.id for c in menu.children] == ids

    # Switch model ▸ B, clicked the way a panel clicks: the daemon loads B.
    panel.click(item, models[MODEL_B])
    wait_for(lambda: serving(daemon.url, MODEL_B), 60, "the daemon to serve B")
    menu = menu_when(lambda m: m.children[2].label.startswith(f"{MODEL_B}: chat"),
                     "the menu to tick B")
    assert menu.children[2].ticked
    wait_for(lambda: notifications.matching(f"{MODEL_B} is ready"), 10, "B's ready notification")

    # A load that fails: one notification with the reason, however many polls see the failure.
    panel.click(item, menu.find("Switch model").find(BAD_MODEL))
    failure = wait_for(lambda: (s := status(daemon.url)) and s["state"] == "failed"
                       and s["failure"], 60, "the load to fail")
    wait_for(lambda: f"{BAD_MODEL} (error)" in panel.prop(item, "Title"), 10,
             "the title to show the error")
    menu = menu_when(lambda m: m.labels()[0].startswith("Error"), "the menu's error line")
    panel.click(item, menu.find("Switch model").find(MODEL_A))
    wait_for(lambda: notifications.matching(f"{MODEL_A} is ready"), 60, "A's ready notification")
    failed = notifications.matching("failed")
    assert len(failed) == 1, failed
    assert BAD_MODEL in failed[0].summary and failure in failed[0].body, failed  # the reason
    assert all(n.app_name == "Qwen Appliance" for n in notifications.received)

    # Stop daemon: the daemon exits, the icon turns grey, and that is no news.
    icon_before = panel.prop(item, "IconName")
    panel.click(item, panel.menu(item).find("Stop daemon"))
    daemon.process.wait(timeout=60)
    stopped_at = time.monotonic()
    wait_for(lambda: (path := panel.prop(item, "IconName")) != icon_before
             and frame_colour(path) == GREY, 5, "the grey icon")
    assert time.monotonic() - stopped_at < 3
    assert "daemon not running" in panel.prop(item, "Title")

    # Start daemon: a daemon with the tray's settings serves the default model again.
    menu = menu_when(lambda m: m.find("Start daemon").enabled, "Start to be offered")
    panel.click(item, menu.find("Start daemon"))
    wait_for(lambda: serving(daemon.url, MODEL_A), 90, "the started daemon to serve A")
    wait_for(lambda: MODEL_A in panel.prop(item, "Title"), 10, "the title to follow")
    assert not notifications.matching("stopped")

    # The daemon going away behind the tray's back is news, once.
    os.kill(status(daemon.url)["pid"], signal.SIGTERM)
    wait_for(lambda: notifications.matching("stopped"), 15, "the stopped notification")
    panel.click(item, panel.menu(item).find("Start daemon"))
    wait_for(lambda: serving(daemon.url, MODEL_A), 90, "the daemon to serve A again")
    wait_for(lambda: panel.menu(item).labels()[0] == "Ready", 10, "the menu to say ready")
    assert len(notifications.matching("stopped")) == 1

    # Quit tray: the process ends and its item leaves the bus.
    panel.click(item, panel.menu(item).find("Quit tray"))
    assert process.wait(timeout=15) == 0
    wait_for(lambda: not panel.name_has_owner(item.bus_name), 5, "the item to leave the bus")


def test_tray_shows_each_resident_model_and_unloads_one(
        desktop: Desktop, models_dir: Path, tiny_embedding_gguf: Path, tmp_path: Path,
        appindicator_python: str) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / f"{MODEL_A}.gguf", folder)
    shutil.copy(tiny_embedding_gguf, folder)
    with tray_for(desktop, folder, tmp_path, appindicator_python) as (daemon, process, _):
        panel = desktop.panel
        item = wait_for(lambda: desktop.watcher.items and desktop.watcher.items[-1], 30,
                        "the item to register")

        def menu_when(condition, what: str):
            return wait_for(lambda: (m := panel.menu(item)) and condition(m) and m, 15, what)

        def lines(menu) -> list[str]:
            """The resident models' lines: between the memory line and Switch model."""
            labels = menu.labels()
            return labels[2:labels.index("Switch model")]

        menu = menu_when(lambda m: lines(m) and lines(m)[0].startswith(MODEL_A),
                         "A's line")
        assert len(lines(menu)) == 1
        r = httpx.post(daemon.url + "/v1/embeddings", json={"model": EMBED, "input": "x"},
                       timeout=120)
        assert r.status_code == 200, r.text
        menu = menu_when(lambda m: len(lines(m)) == 2 and lines(m)[1].endswith(" 0/1 busy"),
                         "a line for the embedding model, its worker idle")
        chat, embedding = menu.children[2:4]
        assert chat.label.startswith(f"{MODEL_A}: chat, ") and chat.ticked
        assert embedding.label.startswith(f"{EMBED}: embedding, ") and not embedding.ticked
        assert embedding.label.endswith(" RAM planned, 0/1 busy") and not embedding.enabled
        # The other model shows in the title too (the plain X11 tray has no menu).
        assert f"{EMBED}: embedding" in panel.prop(item, "Title")

        # A stream on A: its line counts the busy slot, in place (same items, no new layout).
        ids = [c.id for c in menu.children]
        body = {"model": MODEL_A, "prompt": "x", "max_tokens": 4000, "stream": True, **FOREVER}
        with httpx.stream("POST", daemon.url + "/v1/completions", json=body,
                          timeout=60) as running:
            lines_iter = running.iter_lines()
            next(lines_iter)
            busy = menu_when(lambda m: m.children[2].label.endswith(", 1/4 busy"),
                             "A's line to count the busy slot")
            assert [c.id for c in busy.children] == ids

        # Unload ▸ the embedding model: the daemon keeps A, the menu loses the line.
        unload = menu_when(lambda m: m.find("Unload").enabled, "Unload").find("Unload")
        assert unload.props.get("children-display") == "submenu"
        assert unload.labels() == [MODEL_A, EMBED, "All models"]
        panel.click(item, next(c for c in unload.children if c.label == EMBED))
        wait_for(lambda: [m["id"] for m in status(daemon.url)["models"]] == [MODEL_A], 30,
                 "the daemon to unload the embedding model only")
        menu = menu_when(lambda m: len(lines(m)) == 1, "the embedding line to go")
        assert menu.children[2].label.startswith(f"{MODEL_A}: chat")
        assert serving(daemon.url, MODEL_A)

        # Unload ▸ All models: nothing resident, the menu says so.
        all_models = panel.menu(item).find("Unload").find("All models")
        panel.click(item, all_models)
        wait_for(lambda: status(daemon.url)["models"] == [], 30, "every model to unload")
        menu = menu_when(lambda m: "No model loaded" in m.labels(), "No model loaded")
        assert not menu.find("Unload").enabled
        process.terminate()
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)


def test_at_login_the_tray_waits_for_the_panels_watcher(
        desktop: Desktop, tmp_path: Path, appindicator_python: str) -> None:
    """The autostarted tray can come up before the panel: it must not settle for X11 then."""
    from tests.tray.desktop_bus import WATCHER, CallMonitor, Watcher

    desktop.watcher.close()  # the panel is not up yet
    wait_for(lambda: not desktop.panel.name_has_owner(WATCHER), 5, "the watcher to leave")
    monitor = CallMonitor(desktop.bus, "NameHasOwner")
    env = {**desktop.env(), "XDG_CURRENT_DESKTOP": "KDE", "APPLIANCE_PORT": str(free_port()),
           "APPLIANCE_CONFIG": str(tmp_path / "absent.toml")}
    stderr = tmp_path / "tray.err"
    with stderr.open("wb") as err:
        tray = subprocess.Popen([appindicator_python, "-m", "appliance.cli", "tray"], env=env,
                                stdout=err, stderr=subprocess.STDOUT, cwd=REPO)
    watcher = None
    try:
        monitor.wait(WATCHER, 30)  # the tray has asked for the watcher, and found none
        watcher = Watcher(desktop.bus)  # now the panel comes up
        watcher.start()
        item = wait_for(lambda: watcher.items and watcher.items[-1], 30,
                        "the item to register with the late watcher")
        assert "daemon not running" in desktop.panel.prop(item, "Title")
        assert "AppIndicator" in stderr.read_text().splitlines()[0]
    finally:
        tray.terminate()
        tray.wait(timeout=30)
        monitor.close()
        if watcher is not None:
            watcher.close()


def test_without_a_watcher_the_tray_says_it_falls_back_to_x11(
        desktop: Desktop, appindicator_python: str) -> None:
    desktop.watcher.close()
    wait_for(lambda: not desktop.panel.name_has_owner("org.kde.StatusNotifierWatcher"), 5,
             "the watcher to leave")
    env = {**desktop.env(), "XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}
    result = subprocess.run([appindicator_python, "-m", "appliance.tray.backend"], env=env,
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    line = result.stdout.strip()
    assert result.returncode == 0 and "\n" not in line
    assert "X11 tray" in line and "no StatusNotifierWatcher" in line
    assert "gnome-shell-extension-appindicator" in line


def test_tray_deps_makes_a_fresh_venv_ready(tmp_path: Path, appindicator_python: str) -> None:
    system = shutil.which("python3", path="/usr/bin")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not system or subprocess.run([system, "-c", f"import sys; assert '%d.%d' % "
                                     f"sys.version_info[:2] == '{version}'"]).returncode:
        pytest.skip(f"the system's python3 is not Python {version}, as this venv is")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    probe = [str(venv / "bin/python"), "-c", "import gi"]
    assert subprocess.run(probe, capture_output=True).returncode != 0  # not there before

    script = [str(REPO / "installer/tray-deps.sh"), str(venv), "--no-build"]
    first = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "using the system's PyGObject" in first.stdout
    check = ("import gi; gi.require_version('Gtk', '3.0'); "
             "gi.require_version('AyatanaAppIndicator3', '0.1'); "
             "from gi.repository import AyatanaAppIndicator3; import sys; "
             "assert not any('dist-packages' in p and 'qwen_appliance' not in p for p in sys.path)")
    assert subprocess.run([str(venv / "bin/python"), "-c", check]).returncode == 0
    again = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "using the system's" not in again.stdout  # nothing to do
