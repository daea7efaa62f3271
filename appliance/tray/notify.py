"""Desktop notifications (org.freedesktop.Notifications over the session bus), or a log line.

Sending happens on a thread of its own: a slow or hung notification server must not hold up the
poll that keeps the icon current. What to announce, and how often, is appliance.tray.events' job.
"""

from __future__ import annotations

import importlib.util
import logging
import queue
import threading
from typing import Any, Protocol

log = logging.getLogger(__name__)

APP_NAME = "Qwen Appliance"
TIMEOUT_MS = 5000


class Notifier(Protocol):
    def send(self, summary: str, body: str) -> None: ...

    def close(self) -> None: ...


class LogNotifier:
    """Where there is no session bus or no PyGObject: the message goes to the log only."""

    def send(self, summary: str, body: str) -> None:
        log.info("%s: %s", summary, body)

    def close(self) -> None:
        pass


class DesktopNotifier:
    """Notify through the session bus (GNOME Shell, Plasma, dunst, ... own the name)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tray-notify", daemon=True)
        self._thread.start()

    def send(self, summary: str, body: str) -> None:
        log.info("%s: %s", summary, body)
        self._queue.put((summary, body))

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        from appliance.tray.dbus import gio

        Gio, GLib = gio()

        while (message := self._queue.get()) is not None:
            summary, body = message
            args = GLib.Variant("(susssasa{sv}i)", (
                APP_NAME, 0, "dialog-information", summary, body, [],
                {"desktop-entry": GLib.Variant("s", "qwen-appliance-tray")}, -1))
            try:
                self._connection.call_sync(
                    "org.freedesktop.Notifications", "/org/freedesktop/Notifications",
                    "org.freedesktop.Notifications", "Notify", args, GLib.VariantType("(u)"),
                    Gio.DBusCallFlags.NONE, TIMEOUT_MS, None)
            except GLib.Error as e:  # no notification server: the log line above is all we have
                log.debug("notification not shown: %s", e.message)


def make_notifier() -> Notifier:
    """A desktop notifier when PyGObject and a session bus are there, else the log."""
    if importlib.util.find_spec("gi") is None:
        return LogNotifier()
    from appliance.tray.dbus import gio, session_bus

    _, GLib = gio()
    try:
        return DesktopNotifier(session_bus())
    except GLib.Error as e:
        log.info("no session bus for notifications (%s): they go to the log", e.message)
        return LogNotifier()
