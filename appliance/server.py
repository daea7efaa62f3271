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


# Idle connections stay open this long (uvicorn's default is 5 s): a client, or another
# appliance routing models here, reuses its connection across a pause in a conversation instead
# of opening a new one (a connect on both sides, on the way to the first token).
KEEP_ALIVE_S = 65


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
    # httpx logs every request it sends at INFO: one stderr write per proxied request, on the
    # event loop before its first chunk is relayed; our own access log is debug-only too.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(level == "debug")


def notify_systemd(message: str) -> None:
    """sd_notify: tell systemd (Type=notify) we are ready, alive or stopping; no-op elsewhere.
    Never blocks: it runs on the event loop, and a full socket must not stall the daemon."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(address)
            sock.send(message.encode())
        except OSError as e:  # the manager is gone or busy: nothing to tell, nothing to wait for
            log.debug("sd_notify %r failed: %s", message, e)


# A decode step running this long means a wedged engine (the slowest plausible step, a 512-token
# prompt chunk of an 8B model on two CPU cores, takes about half a minute).
ENGINE_STALL_S = 120.0


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (from WATCHDOG_USEC), when this process is the one watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def feed_watchdog(app: object, interval: float) -> None:
    """Ping systemd while the event loop runs and the engine is healthy; a dead or wedged
    engine stops the pings, and systemd restarts the daemon."""
    while True:
        manager = getattr(app.state, "manager", None)  # type: ignore[attr-defined]
        if manager is None or manager.engine_healthy(ENGINE_STALL_S):
            notify_systemd("WATCHDOG=1")
        else:
            log.error("engine unhealthy; no longer feeding the systemd watchdog")
        await asyncio.sleep(interval)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, extra_port: int | None = None) -> None:
        super().__init__(config)
        self.extra_port = extra_port  # ollama_port: the same app on a second port

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM after a graceful shutdown; a clean stop should exit 0.
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            await self._listen_too()
            notify_systemd("READY=1\nSTATUS=serving")
            log.info("serving on http://%s:%d", self.config.host, self.config.port)
            interval = watchdog_interval()
            if interval:
                self._watchdog = asyncio.create_task(feed_watchdog(self.config.app, interval))

    async def _listen_too(self) -> None:
        """Accept connections on `extra_port` as well; a port in use is logged, not fatal: the
        main port, the tray and the CLI keep working (Ollama itself may hold 11434)."""
        if self.extra_port is None:
            return
        config, loop = self.config, asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:  # what uvicorn's startup makes for its own port
            return config.http_protocol_class(config=config, server_state=self.server_state,
                                              app_state=self.lifespan.state, _loop=loop)

        try:
            server = await loop.create_server(protocol, host=config.host, port=self.extra_port,
                                              backlog=config.backlog)
        except OSError as e:
            log.error("cannot also serve on port %d (ollama_port): %s; is Ollama running "
                      "there?", self.extra_port, e.strerror or e)
            return
        self.servers.append(server)  # closed with the others on shutdown
        log.info("also serving on http://%s:%d (ollama_port)", config.host, self.extra_port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        notify_systemd("STOPPING=1")
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is not None:
            watchdog.cancel()
        # Streams get switch_wait_s to finish; then they end with an error event and [DONE],
        # before uvicorn's own (longer) graceful timeout would cut their connections.
        state = self.config.app.state
        drain = asyncio.create_task(state.manager.drain(state.settings.switch_wait_s))
        # Pulls are cancelled at once: their progress streams end (so their connections do not
        # hold the stop) and each partial file is left whole for the next pull to resume.
        jobs = getattr(state, "pull_jobs", None)
        pulls = asyncio.create_task(asyncio.to_thread(jobs.stop)) if jobs is not None else None
        await super().shutdown(sockets)
        await drain
        if pulls is not None and (left := await pulls):
            log.warning("stopping while pulls of %s still run; their partial files are kept",
                        ", ".join(left))


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=settings.log_level == "debug", use_colors=False,
                            timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=int(settings.switch_wait_s) + 5,
                            server_header=False)
    server = _Server(config, extra_port=settings.ollama_port)
    server.run()  # on uvloop, and httptools parsing requests, when installed (they are)
    return 0 if server.started else 1
