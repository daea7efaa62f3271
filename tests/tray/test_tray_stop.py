"""Stopping the tray while its poll hands the icon a change: the poll finishes first. pystray's
X11 backend runs each call from another thread on its loop and waits on one reply queue shared by
all callers; a title change and a stop in flight together once hung a test in Icon.stop. A fake
icon, whose title change waits until the test lets it go, shows the order."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from appliance.client import DaemonError
from appliance.tray.app import TrayApp
from appliance.tray.notify import LogNotifier


class ErrorClient:
    """A daemon that answers every poll with an error: the icon changes at the first poll."""

    def status(self) -> dict[str, Any]:
        raise DaemonError("broken for the test")


def test_stop_waits_for_the_poll_to_finish_with_the_icon(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # No menu objects: pystray picks its backend (and wants a display) when first imported,
    # which must stay the business of the tests with a real tray host.
    monkeypatch.setattr(TrayApp, "_build_menu", lambda self, items: items)
    calls: list[str] = []
    entered, release = threading.Event(), threading.Event()

    class SlowIcon:
        def __init__(self, name: str, image: Any, title: str, menu: Any) -> None:
            self.icon, self.menu, self.visible, self._title = image, menu, False, title
            self._stopped = threading.Event()

        def run(self, setup: Any) -> None:
            setup(self)
            self._stopped.wait(120)

        @property
        def title(self) -> str:
            return self._title

        @title.setter
        def title(self, text: str) -> None:  # the loop busy with the poll's change
            calls.append("title")
            entered.set()
            release.wait(120)
            self._title = text
            calls.append("title done")

        def update_menu(self) -> None:
            pass

        def stop(self) -> None:
            calls.append("stop")
            self._stopped.set()

    app = TrayApp(ErrorClient(), control=None, icon_factory=SlowIcon, poll_s=0.05,  # type: ignore[arg-type]
                  notifier=LogNotifier())
    runner = threading.Thread(target=app.run, daemon=True)
    runner.start()
    assert entered.wait(120), "the poll never changed the title"
    stopper = threading.Thread(target=app.stop, daemon=True)
    stopper.start()
    # A window for a stop that does not wait to reach the icon; one that waits passes however
    # long this is.
    stopper.join(timeout=1.0)
    release.set()
    stopper.join(timeout=120)
    runner.join(timeout=120)
    assert not stopper.is_alive() and not runner.is_alive()
    assert calls == ["title", "title done", "stop"]
