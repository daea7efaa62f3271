"""pystray's AppIndicator icon with what the tray adds on top.

- `relabel` changes the text of status lines in place: libdbusmenu then sends
  ItemsPropertiesUpdated for those items only, so a menu the user holds open stays open, where a
  rebuilt menu would replace the whole layout.
- Closing pystray's own notification at exit must not fail the exit when no notification server
  is running (we send ours through appliance.tray.notify).

Importing this module initialises GTK: import it only once the AppIndicator backend is chosen.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore", ImportWarning)  # PyGObject < 3.44's importer (see dbus.py)
    from gi.repository import GLib
    from pystray._appindicator import Icon
    from pystray._util.gtk import mainloop

log = logging.getLogger(__name__)


class IndicatorIcon(Icon):  # type: ignore[misc]
    def relabel(self, labels: dict[int, str]) -> None:
        """Set the labels of top-level menu items by position (from any thread)."""
        self._relabel(labels)

    @mainloop
    def _relabel(self, labels: dict[int, str]) -> None:
        menu: Any = getattr(self, "_menu_handle", None)
        if menu is None:
            return
        children = menu.get_children()
        for index, text in labels.items():
            if index < len(children):
                children[index].set_label(text)

    def _finalize(self) -> None:
        try:
            super()._finalize()
        except GLib.Error as e:
            log.debug("closing the last notification failed: %s", e.message)
