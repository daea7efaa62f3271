"""What is worth a desktop notification, and how often.

Three events: a model became ready (after a switch or a start), a load failed (with the
reason), the daemon stopped without being asked to. They are found by comparing consecutive
snapshots, so a state that lasts many polls is one event; each event has a key, and a key is
announced at most once within `repeat_after_s`, with at most `burst` notifications in any
`window_s`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from appliance.tray.notify import Notifier
from appliance.tray.snapshot import Snapshot, TrayState, memory_line

SERVING = (TrayState.READY, TrayState.BUSY)
STOP_GRACE_S = 120.0  # a stop asked for this long ago still explains the daemon going away


@dataclass(frozen=True)
class Notice:
    key: tuple[str, ...]  # the event's identity: one notification per key
    summary: str
    body: str


def ready(model: str, body: str = "") -> Notice:
    return Notice(("ready", model), f"{model} is ready", body)


def load_failed(model: str, reason: str) -> Notice:
    # Keyed by model only: the failed request and the next poll report the same failure in
    # different words.
    return Notice(("failed", model), f"Loading {model} failed", reason[:300])


def pulled(model: str) -> Notice:
    return Notice(("pulled", model), f"{model} is ready to use",
                  "Downloaded and checked; choose it under Switch model.")


def pull_failed(model: str, reason: str) -> Notice:
    return Notice(("pull-failed", model), f"Getting {model} failed", reason[:300])


def stopped_unexpectedly() -> Notice:
    return Notice(("stopped",), "The Qwen Appliance daemon stopped",
                  "It stopped without being asked to; start it again from the tray menu, "
                  "and see Open logs for why.")


def notices(prev: Snapshot | None, new: Snapshot, stop_expected: bool) -> list[Notice]:
    """The events between two consecutive snapshots (none on the first look)."""
    if prev is None:
        return []
    found = []
    if new.state in SERVING and new.model and (prev.model != new.model
                                               or prev.state not in SERVING):
        found.append(ready(new.model, memory_line(new)))
    # An ERROR with a model is a failed load; without one the daemon answered with an error.
    if (new.state is TrayState.ERROR and new.model and new.message
            and (prev.state is not TrayState.ERROR or prev.model != new.model)):
        found.append(load_failed(new.model, new.message))
    if prev.running and not new.running and not stop_expected:
        found.append(stopped_unexpectedly())
    running = {p.model for p in prev.pulls if not p.finished}
    for p in new.pulls:
        if p.finished and p.model in running:
            found.append(pull_failed(p.model, p.error) if p.error else pulled(p.model))
    return found


class Announcer:
    """Turns snapshots and failed actions into rate-limited notifications (thread-safe)."""

    def __init__(self, notifier: Notifier, clock: Callable[[], float] = time.monotonic,
                 repeat_after_s: float = 60.0, burst: int = 4, window_s: float = 60.0) -> None:
        self.notifier = notifier
        self.clock = clock
        self.repeat_after_s = repeat_after_s
        self.burst = burst
        self.window_s = window_s
        self._lock = threading.Lock()
        self._prev: Snapshot | None = None
        self._stop_asked_at: float | None = None
        self._last_sent: dict[tuple[str, ...], float] = {}
        self._recent: deque[float] = deque()

    def expect_stop(self) -> None:
        """The user asked the daemon to stop: its going away is no news."""
        with self._lock:
            self._stop_asked_at = self.clock()

    def observe(self, snapshot: Snapshot) -> None:
        with self._lock:
            now = self.clock()
            expected = (self._stop_asked_at is not None
                        and now - self._stop_asked_at < STOP_GRACE_S)
            found = notices(self._prev, snapshot, expected)
            if not snapshot.running:
                self._stop_asked_at = None  # consumed: the next stop is news again
            self._prev = snapshot
        for notice in found:
            self.announce(notice)

    def announce(self, notice: Notice) -> bool:
        """Send unless the same event was sent lately or too many went out; True if sent."""
        with self._lock:
            now = self.clock()
            last = self._last_sent.get(notice.key)
            if last is not None and now - last < self.repeat_after_s:
                return False
            while self._recent and now - self._recent[0] >= self.window_s:
                self._recent.popleft()
            if len(self._recent) >= self.burst:
                return False
            self._last_sent[notice.key] = now
            self._recent.append(now)
        self.notifier.send(notice.summary, notice.body)
        return True
