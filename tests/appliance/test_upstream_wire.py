"""The lean client we forward requests with (appliance/upstream/wire.py), against real sockets:
a server on 127.0.0.1 that answers each request with what the test scripts, including what a
broken or hostile upstream would send."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import httpx
import pytest

from appliance.upstream.wire import MAX_HEADER_BYTES, WireClient

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    body = await reader.readexactly(int(match.group(1))) if match else b""
    return head + body


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def with_server(answer: Answer, test: Callable[[WireClient, list[int]], Awaitable[None]],
                      *, timeout_s: float = 5.0) -> list[int]:
    """Run `test` with a client of a server whose connections are counted as they open."""
    opened: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(1)
        try:
            await answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = WireClient(f"http://127.0.0.1:{port}/v1/", {"Authorization": "Bearer k"},
                        timeout_s=timeout_s, connect_timeout_s=timeout_s, keepalive_s=60)
    try:
        await test(client, opened)
    finally:
        await client.aclose()
        server.close()
    return opened


def test_requests_in_a_row_share_one_connection_and_send_our_headers() -> None:
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(ok(b'{"n": %d}' % len(seen)))
            await writer.drain()

    async def test(client: WireClient, opened: list[int]) -> None:
        for n in (1, 2, 3):
            response = await client.post("chat/completions", b'{"x": 1}',
                                         {"Content-Type": "application/json"})
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            assert b"".join([c async for c in response.aiter_bytes()]) == b'{"n": %d}' % n
            await response.aclose()

    assert len(asyncio.run(with_server(answer, test))) == 1
    first = seen[0].decode()
    assert first.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert "Authorization: Bearer k" in first and first.endswith('{"x": 1}')


def test_a_response_left_unread_closes_its_connection() -> None:
    """How an upstream learns that our client left: its connection closes."""
    closed = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n")
        await writer.drain()
        await reader.read()  # until the client closes
        closed.set()

    async def test(client: WireClient, opened: list[int]) -> None:
        response = await client.post("x", b"{}", {})
        chunks = response.aiter_bytes()
        assert await chunks.__anext__() == b"data:"
        await response.aclose()
        await asyncio.wait_for(closed.wait(), 30)

    asyncio.run(with_server(answer, test))


def test_a_pooled_connection_the_server_closed_is_not_reused() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"{}"))  # and the server closes: a keep-alive timeout on its side
        await writer.drain()

    async def test(client: WireClient, opened: list[int]) -> None:
        for _ in range(2):
            response = await client.post("x", b"{}", {})
            assert [c async for c in response.aiter_bytes()] == [b"{}"]
            # Wait until the close has reached our side, as it has after any real pause.
            deadline = asyncio.get_running_loop().time() + 30
            while not all(c.reader.at_eof() for c in client._idle):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)

    assert len(asyncio.run(with_server(answer, test))) == 2


@pytest.mark.parametrize(("reply", "error"), [
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (4 * MAX_HEADER_BYTES) + b"\r\n\r\n",
     httpx.RemoteProtocolError),
    (b"SMTP ready\r\n\r\n", httpx.RemoteProtocolError),
    (b"", httpx.RemoteProtocolError),  # closed before answering
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", httpx.RemoteProtocolError),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", httpx.RemoteProtocolError),
])
def test_broken_answers_are_protocol_errors(reply: bytes, error: type[Exception]) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async def test(client: WireClient, opened: list[int]) -> None:
        with pytest.raises(error):
            response = await client.post("x", b"{}", {})
            try:
                async for _ in response.aiter_bytes():
                    pass
            finally:
                await response.aclose()

    asyncio.run(with_server(answer, test))


def test_a_silent_upstream_times_out_and_a_closed_port_cannot_connect() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers

    async def test(client: WireClient, opened: list[int]) -> None:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("x", b"{}", {})

    asyncio.run(with_server(answer, test, timeout_s=0.5))

    async def closed_port() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = WireClient(f"http://127.0.0.1:{port}", {}, timeout_s=5, connect_timeout_s=5,
                            keepalive_s=60)
        with pytest.raises(httpx.ConnectError):
            await client.post("x", b"{}", {})

    asyncio.run(closed_port())


def test_only_http_urls() -> None:
    with pytest.raises(ValueError):
        WireClient("file:///etc/passwd", {}, timeout_s=1, connect_timeout_s=1, keepalive_s=1)
