"""A lean HTTP/1.1 client for the requests we send an upstream: h11 on asyncio streams, with
idle connections kept for reuse.

Why not httpx here: on the way to a streamed answer's first token, httpx and httpcore cost about
3 ms of CPU per request on our 2-core machines (their models, pool locks and a cancel scope per
read), a third of what routing a request cost the daemon; this costs about 1 ms. The background
listing of an upstream's models still uses httpx.

Failures are raised as httpx's exception types, so the callers' one mapping to our errors
(`exchange.guarded_send`) covers both clients: ConnectError/ConnectTimeout, ReadTimeout,
WriteTimeout, ReadError, WriteError, RemoteProtocolError. h11 bounds what a hostile server can
make us hold: a status line and headers over MAX_HEADER_BYTES are a protocol error.

A response not read to its end is closed, never reused: closing the connection is how an
OpenAI-compatible server learns that the client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import h11
import httpx

READ_BYTES = 64 * 2**10
MAX_HEADER_BYTES = 64 * 2**10
MAX_CONNECTIONS = 256  # at once to one upstream; more requests wait for one to end
MAX_IDLE = 32


class _Connection:
    """One socket to the upstream and its HTTP/1.1 state."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.idle_since = 0.0

    def reusable(self, now: float, keepalive_s: float) -> bool:
        return (now - self.idle_since < keepalive_s and not self.reader.at_eof()
                and not self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """A response with its status and headers read; its body is read by `aiter_bytes`."""

    def __init__(self, client: WireClient, connection: _Connection, head: h11.Response) -> None:
        self._client = client
        self._connection: _Connection | None = connection
        self.status_code = head.status_code
        # Lower-case names; of a repeated header the last one (we read only single ones).
        self.headers = {name.decode("latin-1"): value.decode("latin-1")
                        for name, value in head.headers}

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; the connection goes back to the pool at its end."""
        while (connection := self._connection) is not None:
            event = await self._client._next_event(connection)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._connection = None
                self._client._release(connection)

    async def aclose(self) -> None:
        """Let go; a body not read to its end closes the connection."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
            self._client._slots.release()


class WireClient:
    """Requests to one upstream base URL, with our own headers on every request."""

    def __init__(self, base_url: str, headers: dict[str, str], *, timeout_s: float,
                 connect_timeout_s: float, keepalive_s: float) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._tls = ssl.create_default_context() if url.scheme == "https" else None
        self._base_path = url.path.rstrip("/")
        host_header = url.netloc.rsplit("@", 1)[-1]
        self._headers = [("Host", host_header), *headers.items()]
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST `body` to base URL + "/" + `path`; the response once its headers are in."""
        with _as_httpx_errors():
            request = h11.Request(method="POST", target=f"{self._base_path}/{path}",
                                  headers=[*self._headers, *headers.items(),
                                           ("Content-Length", str(len(body)))])
        await self._slots.acquire()
        connection: _Connection | None = None
        try:
            connection = await self._checkout()
            with _as_httpx_errors():
                data = connection.h11.send(request) + connection.h11.send(h11.Data(data=body))
                data += connection.h11.send(h11.EndOfMessage())
            await self._write(connection, data)
            while True:
                event = await self._next_event(connection)
                if isinstance(event, h11.Response):
                    return UpstreamResponse(self, connection, event)
                # An informational response (100 Continue, 103 Early Hints): the real one follows.
        except BaseException:
            if connection is not None:
                connection.close()
            self._slots.release()
            raise

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    async def _checkout(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable(now, self._keepalive_s):
                return connection
            connection.close()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=self._tls,
                                        limit=READ_BYTES),
                self._connect_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise httpx.ConnectTimeout("timed out connecting") from None
        except OSError as e:
            raise httpx.ConnectError(str(e)) from e
        return _Connection(reader, writer)

    async def _write(self, connection: _Connection, data: bytes) -> None:
        try:
            connection.writer.write(data)
            await asyncio.wait_for(connection.writer.drain(), self._timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise httpx.WriteTimeout("timed out sending") from None
        except OSError as e:
            raise httpx.WriteError(str(e) or type(e).__name__) from e

    async def _next_event(self, connection: _Connection) -> h11.Event:
        while True:
            with _as_httpx_errors():
                event = connection.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await asyncio.wait_for(connection.reader.read(READ_BYTES),
                                                  self._timeout_s)
                except (TimeoutError, asyncio.TimeoutError):
                    raise httpx.ReadTimeout("timed out reading") from None
                except OSError as e:
                    raise httpx.ReadError(str(e) or type(e).__name__) from e
                with _as_httpx_errors():
                    connection.h11.receive_data(data)  # b"": the server closed
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the server closed the connection")
            return event

    def _release(self, connection: _Connection) -> None:
        """A response read to its end: keep its connection for the next request if we can."""
        self._slots.release()
        h = connection.h11
        if (h.our_state is h11.DONE and h.their_state is h11.DONE
                and len(self._idle) < MAX_IDLE):
            h.start_next_cycle()
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except h11.RemoteProtocolError as e:
        raise httpx.RemoteProtocolError(str(e)) from None
    except h11.LocalProtocolError as e:  # a header of ours h11 refuses: our bug or our config
        raise httpx.LocalProtocolError(f"cannot send the request: {e}") from None
