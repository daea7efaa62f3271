"""The session bus through PyGObject's Gio, for the calls the tray makes itself (the watcher
check, notifications). Import only where PyGObject is importable."""

from __future__ import annotations

import warnings
from typing import Any


def gio() -> tuple[Any, Any]:
    """The Gio and GLib modules."""
    import gi

    gi.require_version("Gio", "2.0")
    with warnings.catch_warnings():
        # PyGObject < 3.44 (Debian 12's) loads namespaces through a legacy importer, which
        # Python 3.10+ flags with an ImportWarning; it is harmless.
        warnings.simplefilter("ignore", ImportWarning)
        from gi.repository import Gio, GLib
    return Gio, GLib


def session_bus() -> Any:
    """The shared session-bus connection; raises GLib.Error when there is none."""
    Gio, _ = gio()
    return Gio.bus_get_sync(Gio.BusType.SESSION, None)
