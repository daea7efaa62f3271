"""A daemon that takes the connection but answers late (busy loading or decoding) is not a daemon
that stopped: the tray keeps what it showed for a few polls, with no "stopped" notification, and
only then says the daemon is not answering."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from appliance.client import DaemonClient, DaemonTimeout, DaemonUnavailable
from appliance.tray.app import LATE_POLLS_TOLERATED, TrayApp
from appliance.tray.notify import LogNotifier
from appliance.tray.service import DaemonControl
from appliance.tray.snapshot import Snapshot, TrayState


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A listening socket whose backlog takes connections that nobody ever answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def test_a_late_answer_is_a_timeout_not_a_stop(silent_port: int) -> None:
    client = DaemonClient(f"http://127.0.0.1:{silent_port}", timeout=0.2)
    with pytest.raises(DaemonTimeout):
        client.status()


def test_the_tray_tolerates_late_polls_then_says_not_answering(silent_port: int) -> None:
    app = TrayApp(DaemonClient(f"http://127.0.0.1:{silent_port}", timeout=0.2), DaemonControl(),
                  notifier=LogNotifier())
    shown = Snapshot(TrayState.READY, "model-a", False)
    app.snapshot = shown
    for _ in range(LATE_POLLS_TOLERATED - 1):
        assert app.poll_once() is shown
    late = app.poll_once()
    assert late.state is TrayState.ERROR and "did not answer" in (late.message or "")


def test_a_refused_connection_is_still_a_stop() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        client = DaemonClient(f"http://127.0.0.1:{port}", timeout=0.2)
        with pytest.raises(DaemonUnavailable) as caught:
            client.status()
        assert not isinstance(caught.value, DaemonTimeout)
        app = TrayApp(client, DaemonControl(), notifier=LogNotifier())
        assert app.poll_once().state is TrayState.STOPPED
