"""Which tray backend `appliance tray` uses, and why, in one line.

GNOME (with its AppIndicator extension) and KDE Plasma show tray icons only as
StatusNotifierItems over D-Bus; pystray reaches them only through its AppIndicator backend, which
needs PyGObject and the Ayatana AppIndicator typelib. Everywhere else (or when those are missing)
the plain X11 tray (XEmbed) is the fallback: an icon and a title, no menu.

`python -m appliance.tray.backend` prints the verdict; installer/tray-deps.sh runs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

APPINDICATOR = "appindicator"
XORG = "xorg"
WATCHER = "org.kde.StatusNotifierWatcher"  # libayatana-appindicator registers with this name
# At login the autostarted tray can come up before GNOME Shell's extension or Plasma's panel own
# the watcher name; a tray that fell back to X11 then would stay without a menu all session.
WATCHER_WAIT_S = 10.0
WATCHER_POLL_S = 0.2
TYPELIB_PACKAGE = "gir1.2-ayatanaappindicator3-0.1"
GNOME_EXTENSION_PACKAGE = "gnome-shell-extension-appindicator"
DESCRIPTIONS = {
    APPINDICATOR: "AppIndicator (StatusNotifierItem over D-Bus, with a menu)",
    XORG: "the plain X11 tray (an icon and a title, no menu; a left click opens the API docs)",
}


@dataclass(frozen=True)
class BackendChoice:
    name: str  # a pystray backend: "appindicator" or "xorg"
    reason: str
    hint: str | None = None  # what to install or enable to get the AppIndicator backend

    def line(self) -> str:
        """One line for the terminal: the backend, why, and the fix when it is the fallback."""
        text = f"tray: {DESCRIPTIONS.get(self.name, self.name)}: {self.reason}"
        return f"{text} ({self.hint})" if self.hint else text


def appindicator_missing() -> str | None:
    """What the AppIndicator backend lacks in this Python (and how to get it), or None."""
    if importlib.util.find_spec("gi") is None:
        return ("PyGObject (gi) is not importable in this Python: run installer/tray-deps.sh "
                "VENV (it needs the system package python3-gi)")
    import gi

    try:
        gi.require_version("Gtk", "3.0")
    except ValueError:
        return "the GTK 3 typelib is missing: sudo apt install gir1.2-gtk-3.0"
    # pystray tries the Ubuntu-only AppIndicator3 first, then Ayatana's.
    for namespace in ("AppIndicator3", "AyatanaAppIndicator3"):
        try:
            gi.require_version(namespace, "0.1")
            return None
        except ValueError:
            continue
    return f"the AppIndicator typelib is missing: sudo apt install {TYPELIB_PACKAGE}"


def watcher_present(wait_s: float = 0.0) -> tuple[bool | None, str]:
    """Whether a StatusNotifierWatcher owns its name on the session bus (None: no bus to ask),
    and why; waits up to `wait_s` for one to appear."""
    from appliance.tray.dbus import gio, session_bus

    Gio, GLib = gio()
    deadline = time.monotonic() + wait_s
    try:
        bus = session_bus()
        while True:
            reply = bus.call_sync(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                "NameHasOwner", GLib.Variant("(s)", (WATCHER,)), GLib.VariantType("(b)"),
                Gio.DBusCallFlags.NONE, 2000, None)
            if reply.unpack()[0]:
                return True, f"a StatusNotifierWatcher ({WATCHER}) is on the session bus"
            if time.monotonic() >= deadline:
                return False, "no StatusNotifierWatcher on the session bus"
            time.sleep(WATCHER_POLL_S)
    except GLib.Error as e:
        return None, f"no D-Bus session bus ({e.message})"


def _watcher_hint(environ: Mapping[str, str]) -> str | None:
    if "GNOME" in environ.get("XDG_CURRENT_DESKTOP", "").upper():
        return (f"on GNOME: sudo apt install {GNOME_EXTENSION_PACKAGE}, enable it in Extensions, "
                "log out and in")
    return None


def choose_backend(environ: Mapping[str, str] | None = None,
                   wait_s: float | None = None) -> BackendChoice:
    """AppIndicator where a StatusNotifierWatcher is on the session bus and the libraries are
    there; the X11 tray otherwise. PYSTRAY_BACKEND, when set, wins.

    In a desktop session (XDG_CURRENT_DESKTOP set) the tray may start at login before the panel
    has its watcher up: there it waits up to WATCHER_WAIT_S for one, unless `wait_s` says
    otherwise.
    """
    environ = os.environ if environ is None else environ
    if wait_s is None:
        wait_s = WATCHER_WAIT_S if environ.get("XDG_CURRENT_DESKTOP") else 0.0
    forced = environ.get("PYSTRAY_BACKEND")
    if forced:
        return BackendChoice(forced, f"PYSTRAY_BACKEND={forced} is set")
    missing = appindicator_missing()
    if missing:
        return BackendChoice(XORG, "the AppIndicator backend cannot run", missing)
    present, why = watcher_present(wait_s)
    if present:
        return BackendChoice(APPINDICATOR, why)
    return BackendChoice(XORG, why, None if present is None else _watcher_hint(environ))


class TrayUnavailable(Exception):
    """The chosen tray backend cannot run here (a display it cannot open, a library missing)."""


def icon_class(name: str) -> Any:
    """The pystray Icon class of a backend (ours for AppIndicator, with in-place relabelling)."""
    # pystray picks a backend when it is first imported: make that the chosen one, so the X11
    # fallback does not load GTK for nothing.
    os.environ["PYSTRAY_BACKEND"] = name
    if name == APPINDICATOR:
        # The tray draws nothing with OpenGL, but GTK probes GLX at start-up and so loads the GL
        # driver: on Xvfb Mesa's llvmpipe, 43 MB of LLVM in RSS (measured: 111 -> 57 MB).
        os.environ.setdefault("GDK_GL", "disable")
        from appliance.tray.indicator import IndicatorIcon

        return IndicatorIcon
    return importlib.import_module(f"pystray._{name}").Icon


def open_backend(out: TextIO | None = None) -> Any:
    """Choose the backend, say which and why in one line, and load its Icon class."""
    choice = choose_backend()
    print(choice.line(), file=out or sys.stderr, flush=True)
    try:
        return icon_class(choice.name)
    except Exception as e:  # pystray, GTK and Xlib each raise their own kind for a bad display
        message = f"cannot open the display for the {choice.name} tray: {e}"
        raise TrayUnavailable(message.splitlines()[0]) from e


def main() -> int:
    """Print the verdict; exit 0 when the AppIndicator backend's libraries are all there."""
    choice = choose_backend(wait_s=0.0)
    print(choice.line())
    return 0 if appindicator_missing() is None else 1


if __name__ == "__main__":
    sys.exit(main())
