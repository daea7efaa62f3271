"""The tray process: polls the daemon off the UI thread and keeps the icon, title and menu current.

Network calls and actions run on background threads; pystray's loop only ever gets a finished
image, title and menu.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import webbrowser
from collections.abc import Callable
from typing import Any

from appliance.client import DaemonClient, DaemonError, DaemonUnavailable
from appliance.tray.icon import render_icon
from appliance.tray.menu import SEPARATOR, Item, menu_spec
from appliance.tray.service import DaemonControl
from appliance.tray.snapshot import Snapshot, TrayState, from_api, stopped, title

log = logging.getLogger(__name__)

POLL_S = 1.5
MAX_BACKOFF_S = 10.0


class TrayActions:
    """What the menu items do; each runs on the action thread, never on the UI thread."""

    def __init__(self, client: DaemonClient, control: DaemonControl,
                 notify: Callable[[str], None]) -> None:
        self.client = client
        self.control = control
        self.notify = notify
        self.models_dir: str | None = None

    def start(self, _: str | None = None) -> None:
        self.notify(self.control.start())

    def stop(self, _: str | None = None) -> None:
        try:
            pid = self.client.status()["pid"]
        except DaemonUnavailable:
            pid = None
        self.notify(self.control.stop(pid))

    def switch(self, model_id: str | None) -> None:
        assert model_id is not None
        status = self.client.load(model_id)
        self.notify(f"loaded {model_id} ({status['model']['offload']['reason']})")

    def unload(self, _: str | None = None) -> None:
        self.client.unload()

    def open_docs(self, _: str | None = None) -> None:
        webbrowser.open(self.client.url + "/docs")

    def open_models_folder(self, _: str | None = None) -> None:
        if self.models_dir:
            subprocess.Popen(["xdg-open", self.models_dir], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)


class TrayApp:
    def __init__(self, client: DaemonClient, control: DaemonControl,
                 icon_factory: Callable[..., Any] | None = None, poll_s: float = POLL_S) -> None:
        self.client = client
        self.poll_s = poll_s
        self.snapshot: Snapshot = stopped()
        self.actions = TrayActions(client, control, self._notify)
        self._icon_factory = icon_factory
        self._icon: Any = None
        self._stop = threading.Event()
        self._poll_now = threading.Event()
        self._jobs: queue.Queue[tuple[str, str | None] | None] = queue.Queue()

    # -- state -----------------------------------------------------------------------------

    def poll_once(self) -> Snapshot:
        try:
            status = self.client.status()
            models = self.client.models()
            self.actions.models_dir = models.get("models_dir")
            return from_api(status, models)
        except DaemonUnavailable as e:
            return stopped(str(e))
        except DaemonError as e:
            return Snapshot(TrayState.ERROR, message=str(e))

    def _poll_loop(self) -> None:
        delay = self.poll_s
        while not self._stop.is_set():
            snapshot = self.poll_once()
            if snapshot != self.snapshot:
                self.snapshot = snapshot
                self._apply(snapshot)
            # Back off while the daemon is down; poll at once after an action.
            delay = self.poll_s if snapshot.running else min(delay * 2, MAX_BACKOFF_S)
            self._poll_now.wait(delay)
            self._poll_now.clear()

    def _apply(self, snapshot: Snapshot) -> None:
        icon = self._icon
        if icon is None:
            return
        icon.icon = render_icon(snapshot)
        icon.title = title(snapshot)
        icon.menu = self._build_menu(menu_spec(snapshot))
        icon.update_menu()

    # -- actions ---------------------------------------------------------------------------

    def request(self, action: str, arg: str | None = None) -> None:
        """Queue an action (what a menu click does)."""
        if action == "quit":
            self.stop()
            return
        self._jobs.put((action, arg))

    def _action_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            action, arg = job
            try:
                getattr(self.actions, action)(arg)
            except (DaemonUnavailable, DaemonError, OSError, subprocess.SubprocessError) as e:
                self._notify(f"{action} failed: {e}")
            self._poll_now.set()

    def _notify(self, message: str) -> None:
        log.info("%s", message)
        icon = self._icon
        if icon is not None and getattr(icon, "HAS_NOTIFICATION", False):
            try:
                icon.notify(message, "Qwen Appliance")
            except Exception:  # a missing notification daemon must not take the tray down
                log.debug("notification failed", exc_info=True)

    def _build_menu(self, items: tuple[Item, ...]) -> Any:
        import pystray

        def convert(item: Item) -> Any:
            if item is SEPARATOR:
                return pystray.Menu.SEPARATOR
            if item.submenu is not None:
                return pystray.MenuItem(item.label, pystray.Menu(*map(convert, item.submenu)),
                                        enabled=item.enabled)
            action = item.action

            def on_click(icon: Any, menu_item: Any) -> None:
                if action:
                    self.request(action, item.arg)

            return pystray.MenuItem(item.label, on_click, enabled=item.enabled,
                                    checked=(lambda _: item.checked) if item.radio else None,
                                    radio=item.radio, default=item.default)

        return pystray.Menu(*map(convert, items))

    # -- lifetime --------------------------------------------------------------------------

    def run(self) -> None:
        """Create the icon and run its loop (returns on Quit)."""
        factory = self._icon_factory
        if factory is None:
            import pystray

            factory = pystray.Icon
        snapshot = self.snapshot
        self._icon = factory("qwen-appliance", render_icon(snapshot), title(snapshot),
                             self._build_menu(menu_spec(snapshot)))
        workers = [threading.Thread(target=self._poll_loop, name="tray-poll", daemon=True),
                   threading.Thread(target=self._action_loop, name="tray-actions", daemon=True)]

        def setup(icon: Any) -> None:
            icon.visible = True
            for worker in workers:
                worker.start()

        self._icon.run(setup=setup)

    def stop(self) -> None:
        self._stop.set()
        self._poll_now.set()
        self._jobs.put(None)
        if self._icon is not None:
            self._icon.stop()
