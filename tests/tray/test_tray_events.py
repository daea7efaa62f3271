"""Which state changes make a notification, and how often: pure functions and a clock."""

from __future__ import annotations

from appliance.tray.events import Announcer, Notice, load_failed, notices
from appliance.tray.snapshot import Snapshot, TrayState, stopped


def snap(state: TrayState, model: str | None = "a", message: str | None = None) -> Snapshot:
    return Snapshot(state, model, message=message)


READY_A, READY_B = snap(TrayState.READY), snap(TrayState.READY, "b")
FAILED_C = snap(TrayState.ERROR, "c", "unknown tokenizer")


def keys(prev: Snapshot | None, new: Snapshot, stop_expected: bool = False) -> list[tuple]:
    return [n.key for n in notices(prev, new, stop_expected)]


def test_the_first_look_is_no_news() -> None:
    assert keys(None, READY_A) == []
    assert keys(None, stopped()) == []


def test_a_model_becoming_ready() -> None:
    assert keys(snap(TrayState.LOADING, "b"), READY_B) == [("ready", "b")]
    assert keys(READY_A, READY_B) == [("ready", "b")]  # a switch faster than a poll
    assert keys(stopped(), READY_A) == [("ready", "a")]  # after Start daemon
    assert keys(READY_A, snap(TrayState.BUSY)) == []
    assert keys(READY_A, READY_A) == []


def test_a_failed_load_with_its_reason() -> None:
    [notice] = notices(snap(TrayState.LOADING, "c"), FAILED_C, False)
    assert notice.key == ("failed", "c") and notice.body == "unknown tokenizer"
    assert keys(FAILED_C, FAILED_C) == []  # still failed on the next poll: the same event
    # An error answer without a model is the daemon failing a request, not a load.
    assert keys(READY_A, snap(TrayState.ERROR, None, "HTTP 500")) == []


def test_the_daemon_stopping() -> None:
    assert keys(READY_A, stopped()) == [("stopped",)]
    assert keys(READY_A, stopped(), stop_expected=True) == []
    assert keys(stopped(), stopped()) == []


class Recorder:
    """The desktop's side of a notifier: what would have been shown."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, summary: str, body: str) -> None:
        self.sent.append((summary, body))

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_notification_per_event_then_again_after_a_while() -> None:
    recorder, clock = Recorder(), Clock()
    announcer = Announcer(recorder, clock, repeat_after_s=60)
    # The failed request and the next polls all report the one failure.
    assert announcer.announce(load_failed("c", "HTTP 500: unknown tokenizer"))
    for prev, new in [(READY_A, snap(TrayState.LOADING, "c")), (None, FAILED_C),
                      (None, FAILED_C)]:
        if prev:
            announcer.observe(prev)
        announcer.observe(new)
        clock.now += 1.5
    assert len(recorder.sent) == 1
    clock.now += 60
    assert announcer.announce(load_failed("c", "again"))
    assert len(recorder.sent) == 2


def test_a_burst_is_cut_short() -> None:
    recorder, clock = Recorder(), Clock()
    announcer = Announcer(recorder, clock, burst=4, window_s=60)
    sent = [announcer.announce(Notice(("n", str(i)), f"n{i}", "")) for i in range(6)]
    assert sent == [True] * 4 + [False] * 2
    clock.now += 61
    assert announcer.announce(Notice(("n", "6"), "n6", ""))


def test_a_stop_asked_for_is_no_news_once() -> None:
    recorder, clock = Recorder(), Clock()
    announcer = Announcer(recorder, clock)
    announcer.observe(READY_A)
    announcer.expect_stop()
    announcer.observe(stopped())
    assert recorder.sent == []
    announcer.observe(READY_A)
    clock.now += 5
    announcer.observe(stopped())  # this one nobody asked for
    assert [s for s, _ in recorder.sent] == ["a is ready", "The Qwen Appliance daemon stopped"]
