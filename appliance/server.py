"""Run the daemon: uvicorn on the configured address, systemd readiness, clean SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator

import uvicorn

from appliance.api.app import create_app
from appliance.config import Settings

log = logging.getLogger("appliance")


def setup_logging(level: str) -> None:
    """Plain lines on stderr (journald adds time and unit); colour only on a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(name)s: %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(level == "debug")


def notify_systemd(message: str) -> None:
    """sd_notify: tell systemd (Type=notify) we are ready or stopping; no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM after a graceful shutdown; a clean stop should exit 0.
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            notify_systemd("READY=1\nSTATUS=serving")
            log.info("serving on http://%s:%d", self.config.host, self.config.port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        notify_systemd("STOPPING=1")
        # Streams get switch_wait_s to finish; then they end with an error event and [DONE],
        # before uvicorn's own (longer) graceful timeout would cut their connections.
        state = self.config.app.state
        drain = asyncio.create_task(state.manager.drain(state.settings.switch_wait_s))
        await super().shutdown(sockets)
        await drain


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=settings.log_level == "debug", use_colors=False,
                            timeout_graceful_shutdown=int(settings.switch_wait_s) + 5,
                            server_header=False)
    server = _Server(config)
    asyncio.run(server.serve())
    return 0 if server.started else 1
