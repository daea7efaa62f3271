"""The tray process: polls the daemon off the UI thread and keeps the icon, title and menu current.

Network calls and actions run on background threads; pystray's loop only ever gets a finished
image, title and menu. Each is handed over only when it changed: a new icon image when the gauge
looks different, a new menu when the menu's shape changes (state, model, models), and in-place
text for the status lines otherwise.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import webbrowser
from collections.abc import Callable
from typing import Any

from appliance.client import DaemonClient, DaemonError, DaemonTimeout, DaemonUnavailable
from appliance.tray.events import Announcer, Notice, load_failed
from appliance.tray.icon import render_icon
from appliance.tray.menu import SEPARATOR, Item, menu_spec, structure
from appliance.tray.notify import Notifier, make_notifier
from appliance.tray.service import DaemonControl
from appliance.tray.snapshot import Snapshot, TrayState, from_api, stopped, title

log = logging.getLogger(__name__)

POLL_S = 1.5  # a state change shows within this (plus one render), the figure says <= 2 s
MODELS_EVERY = 10  # polls between /api/models reads while nothing changes (files rarely do)
LATE_POLLS_TOLERATED = 3
POLL_END_WAIT_S = 10.0  # stop() waits this long for a poll to finish what it hands the icon
EXPECTED_ERRORS = (DaemonUnavailable, DaemonError, OSError, subprocess.SubprocessError)


class TrayActions:
    """What the menu items do; each runs on the action thread, never on the UI thread."""

    def __init__(self, client: DaemonClient, control: DaemonControl, announcer: Announcer) -> None:
        self.client = client
        self.control = control
        self.announcer = announcer
        self.models_dir: str | None = None

    def start(self, _: str | None = None) -> None:
        log.info("%s", self.control.start())

    def stop(self, _: str | None = None) -> None:
        try:
            pid = self.client.status()["pid"]
        except DaemonUnavailable:
            pid = None
        self.announcer.expect_stop()
        log.info("%s", self.control.stop(pid))

    def switch(self, model_id: str | None) -> None:
        if not model_id:
            raise ValueError("switch needs a model id")
        try:
            self.client.load(model_id)  # the poll announces the model once it is ready
        except DaemonError as e:
            self.announcer.announce(load_failed(model_id, str(e)))

    def unload(self, _: str | None = None) -> None:
        self.client.unload()

    def unload_model(self, model_id: str | None) -> None:
        if not model_id:
            raise ValueError("unload_model needs a model id")
        self.client.unload(model_id)

    def pull(self, ref: str | None) -> None:
        """Start a pull in the daemon and leave: it runs on without us; the poll shows its
        progress in the title and the announcer says when it is done."""
        if not ref:
            raise ValueError("pull needs a model reference")
        for _ in self.client.pull(ref):
            break

    def open_docs(self, _: str | None = None) -> None:
        webbrowser.open(self.client.url + "/docs")

    def open_models_folder(self, _: str | None = None) -> None:
        if self.models_dir:
            _open(self.models_dir)
        else:
            log.info("the models folder is known once the daemon has answered")

    def open_logs(self, _: str | None = None) -> None:
        _open(str(self.control.log_file()))


def _open(target: str) -> None:
    subprocess.Popen(["xdg-open", target], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class TrayApp:
    def __init__(self, client: DaemonClient, control: DaemonControl,
                 icon_factory: Callable[..., Any] | None = None, poll_s: float = POLL_S,
                 notifier: Notifier | None = None) -> None:
        self.client = client
        self.poll_s = poll_s
        self.snapshot: Snapshot = stopped()
        self._late_polls = 0
        self.notifier = notifier or make_notifier()
        self.announcer = Announcer(self.notifier)
        self.actions = TrayActions(client, control, self.announcer)
        self._icon_factory = icon_factory
        self._icon: Any = None
        self._runner: threading.Thread | None = None  # runs the icon's loop
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._poll_now = threading.Event()
        self._jobs: queue.Queue[tuple[str, str | None] | None] = queue.Queue()
        self._models: dict[str, Any] | None = None
        self._library: dict[str, Any] | None = None
        self._models_key: tuple[Any, ...] | None = None
        self._polls_since_models = 0
        # What the icon shows now, so only changes are handed to the UI thread.
        self._shown_image: bytes | None = None
        self._shown_title: str | None = None
        self._shown_spec: tuple[Item, ...] = ()
        self._live_labels: dict[int, str] = {}

    # -- state -----------------------------------------------------------------------------

    def poll_once(self) -> Snapshot:
        try:
            status = self.client.status()
            model = status.get("model") or {}
            key = (status.get("state"), model.get("id"), status.get("target"))
            self._polls_since_models += 1
            if (self._models is None or key != self._models_key
                    or self._polls_since_models >= MODELS_EVERY):
                self._models = self.client.models()
                self._models_key, self._polls_since_models = key, 0
                self.actions.models_dir = self._models.get("models_dir")
                self._library = self._read_library()
            elif self._library and any(not p.get("finished") for p in self._library["pulls"]):
                self._library = self._read_library()  # every poll while a pull runs
            self._late_polls = 0
            return from_api(status, self._models, self._library)
        except DaemonTimeout as e:
            # A daemon busy loading or decoding may miss a poll: that is not a stop (and no
            # "stopped" notification); only several misses in a row say it is not answering.
            self._late_polls += 1
            if self._late_polls < LATE_POLLS_TOLERATED:
                return self.snapshot
            return Snapshot(TrayState.ERROR, message=str(e))
        except DaemonUnavailable as e:
            self._models = None
            return stopped(str(e))
        except DaemonError as e:
            self._models = None
            return Snapshot(TrayState.ERROR, message=str(e))

    def _read_library(self) -> dict[str, Any] | None:
        try:
            return self.client.library()
        except DaemonError:  # an older daemon without the library: no offers, no pulls
            return None

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                snapshot = self.poll_once()
                self.announcer.observe(snapshot)
                if snapshot != self.snapshot:
                    self.snapshot = snapshot
                    self._apply(snapshot)
            except Exception:  # a bug must not freeze the icon: log it and poll on
                log.exception("tray poll failed")
            self._poll_now.wait(self.poll_s)  # an action asks for a poll at once
            self._poll_now.clear()

    def _apply(self, snapshot: Snapshot) -> None:
        icon = self._icon
        if icon is None:
            return
        image = render_icon(snapshot)
        pixels = image.tobytes()
        if pixels != self._shown_image:
            self._shown_image = pixels
            icon.icon = image
        text = title(snapshot)
        if text != self._shown_title:
            self._shown_title = text
            icon.title = text
        spec = menu_spec(snapshot)
        shown, self._shown_spec = self._shown_spec, spec
        changed = {i: item.label for i, item in enumerate(spec)
                   if item.live and self._live_labels.get(i) != item.label}
        self._live_labels.update(changed)
        if structure(spec) != structure(shown):
            icon.menu = self._build_menu(spec)
            icon.update_menu()
        elif changed:
            relabel = getattr(icon, "relabel", None)
            if relabel is not None:
                relabel(changed)
            else:
                icon.update_menu()

    # -- actions ---------------------------------------------------------------------------

    def request(self, action: str, arg: str | None = None) -> None:
        """Queue an action (what a menu click does)."""
        if action == "quit":
            self.stop()
            return
        self._jobs.put((action, arg))

    def _action_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            action, arg = job
            try:
                getattr(self.actions, action)(arg)
            except EXPECTED_ERRORS as e:
                self.announcer.announce(Notice(("action", action, arg or ""),
                                               f"{action.replace('_', ' ').capitalize()} failed",
                                               str(e)))
            except Exception:  # a bug in one action must not end the thread that runs them all
                log.exception("tray action %s(%s) failed", action, arg or "")
            self._poll_now.set()

    def _build_menu(self, items: tuple[Item, ...]) -> Any:
        import pystray

        def convert(index: int, item: Item) -> Any:
            if item is SEPARATOR:
                return pystray.Menu.SEPARATOR
            if item.submenu is not None:
                return pystray.MenuItem(item.label,
                                        pystray.Menu(*(convert(-1, i) for i in item.submenu)),
                                        enabled=item.enabled)
            action = item.action

            def on_click(icon: Any, menu_item: Any) -> None:
                if action:
                    self.request(action, item.arg)

            # pystray rebuilds the menu after each click: live lines read their latest text.
            text: Any = (lambda _: self._live_labels.get(index, item.label)) if item.live \
                else item.label
            checked = None if item.checked is None else (lambda _: bool(item.checked))
            return pystray.MenuItem(text, on_click, enabled=item.enabled, checked=checked,
                                    radio=item.radio, default=item.default)

        return pystray.Menu(*(convert(i, item) for i, item in enumerate(items)))

    # -- lifetime --------------------------------------------------------------------------

    def run(self) -> None:
        """Create the icon and run its loop (returns on Quit); without an icon factory, choose
        the backend (appliance.tray.backend.open_backend) first."""
        factory = self._icon_factory
        if factory is None:
            from appliance.tray.backend import open_backend

            factory = open_backend()  # says which backend and why; raises TrayUnavailable
        snapshot = self.snapshot
        spec = menu_spec(snapshot)
        self._shown_spec, self._shown_title = spec, title(snapshot)
        self._live_labels = {i: item.label for i, item in enumerate(spec) if item.live}
        image = render_icon(snapshot)
        self._shown_image = image.tobytes()
        self._icon = factory("qwen-appliance", image, self._shown_title, self._build_menu(spec))
        self._runner = threading.current_thread()
        self._poller = threading.Thread(target=self._poll_loop, name="tray-poll", daemon=True)
        workers = [self._poller,
                   threading.Thread(target=self._action_loop, name="tray-actions", daemon=True)]

        def setup(icon: Any) -> None:
            icon.visible = True
            for worker in workers:
                worker.start()

        try:
            self._icon.run(setup=setup)
        finally:
            self.notifier.close()

    def stop(self) -> None:
        self._stop.set()
        self._poll_now.set()
        self._jobs.put(None)
        # pystray's X11 backend passes each call from another thread to its loop and waits on
        # one reply queue shared by all callers: a poll handing the icon a new title while this
        # thread hands it the stop can leave one of them waiting for ever (seen: a tray test hung
        # in Icon.stop). So the poll ends first (it checks _stop after each pass), then the icon
        # stops. Not from the loop's own thread (Quit in the menu): the poll may be waiting on it.
        poller = self._poller
        if poller is not None and poller.is_alive() and \
                threading.current_thread() not in (poller, self._runner):
            poller.join(timeout=POLL_END_WAIT_S)
        if self._icon is not None:
            self._icon.stop()
