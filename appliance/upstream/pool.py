"""The configured upstreams: their clients, their model listings and their health.

Each upstream's `/models` listing is fetched by a background task (every REFRESH_S while it is
up, every RETRY_S while it is down, and at once after a proxied request could not reach it), so
neither /v1/models nor a routed request ever waits for an upstream's listing. Routing reads only
that cache and the configuration: an id listed explicitly under `models` routes even before the
first listing (an unreachable upstream then answers 503 rather than the model being unknown).

A local model (id or alias) always wins over an upstream model with the same id, in any case;
between upstreams, the first in the configuration wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from appliance.config import UpstreamSettings
from appliance.metrics import Metrics
from appliance.upstream.wire import UpstreamResponse, WireClient

log = logging.getLogger(__name__)

REFRESH_S = 30.0  # listing and health check while up
RETRY_S = 5.0  # while down: also what a 503 tells the client in Retry-After
CHECK_TIMEOUT_S = 10.0  # a health check never waits longer, whatever timeout_s says
MAX_LISTING_BYTES = 4 * 2**20  # a hostile upstream must not fill our memory with its listing
MAX_LISTED_MODELS = 1000
MAX_ID_CHARS = 256
# An idle connection is kept this long, under another appliance's 65 s keep-alive, so a request
# after a pause (the usual case in a chat) does not open a new one. A server that closes sooner
# (uvicorn's and llama-server's default is 5 s) costs nothing: the pool drops a connection the
# server has closed before reusing it, and a close racing our send is retried once (_send).
KEEPALIVE_S = 60.0


@dataclass
class Health:
    """What the last check of an upstream found."""

    up: bool | None = None  # None until the first check has ended
    last_check: float | None = None  # unix time
    latency_ms: float | None = None  # of the listing request
    error: str | None = None
    model_ids: tuple[str, ...] = ()  # as last listed (kept while it is down)


@dataclass
class Upstream:
    """One `[upstreams.NAME]`: its settings, its clients and its health."""

    name: str
    settings: UpstreamSettings
    client: httpx.AsyncClient  # the background listing
    wire: WireClient  # requests we forward or make for a client
    health: Health = field(default_factory=Health)
    key: str | None = None  # to scrub from anything we pass on; never sent to our clients
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return self.settings.url

    def model_ids(self) -> tuple[str, ...]:
        """The ids this upstream serves for us: the configured list, or its last listing."""
        models = self.settings.models
        return self.health.model_ids if models == "*" else tuple(models)

    def describe(self) -> dict[str, Any]:
        h = self.health
        return {"name": self.name, "url": self.url, "up": h.up, "last_check": h.last_check,
                "latency_ms": h.latency_ms, "models": len(self.model_ids()), "error": h.error}


def _headers(key: str | None) -> dict[str, str]:
    headers = {"Accept-Encoding": "identity", "User-Agent": "qwen-appliance-upstream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def make_wire(settings: UpstreamSettings, key: str | None) -> WireClient:
    # No proxy variables, no ~/.netrc and no redirects, as for the listing client below.
    return WireClient(settings.url + "/", _headers(key), timeout_s=settings.timeout_s,
                      connect_timeout_s=min(CHECK_TIMEOUT_S, settings.timeout_s),
                      keepalive_s=KEEPALIVE_S)


def make_client(settings: UpstreamSettings, key: str | None) -> httpx.AsyncClient:
    headers = _headers(key)
    timeout = httpx.Timeout(settings.timeout_s, connect=min(CHECK_TIMEOUT_S, settings.timeout_s))
    # trust_env=False: no proxy variables and no ~/.netrc credentials sent to a LAN server;
    # redirects are not followed, so a request and its key go only where the url says.
    return httpx.AsyncClient(base_url=settings.url + "/", headers=headers, timeout=timeout,
                             trust_env=False, follow_redirects=False,
                             limits=httpx.Limits(max_connections=256,
                                                 max_keepalive_connections=32,
                                                 keepalive_expiry=KEEPALIVE_S))


class UpstreamPool:
    """Every configured upstream, its background checks, and routing by model id."""

    def __init__(self, configured: dict[str, UpstreamSettings], keys: dict[str, str | None],
                 metrics: Metrics, is_local: Callable[[str], bool],
                 local_now: Callable[[str], bool | None] = lambda _: None) -> None:
        """`is_local(name)`: blocking (it may scan the models folder), run off the loop;
        `local_now(name)`: the same answer without blocking, or None when it cannot tell."""
        self.metrics = metrics
        self._is_local = is_local
        self._local_now = local_now
        self.upstreams = [Upstream(name, s, make_client(s, keys.get(name)),
                                   make_wire(s, keys.get(name)), key=keys.get(name))
                          for name, s in configured.items()]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for upstream in self.upstreams:
            self._tasks.append(asyncio.create_task(self._watch(upstream),
                                                   name=f"upstream-{upstream.name}"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for upstream in self.upstreams:
            await upstream.client.aclose()
            await upstream.wire.aclose()

    def find(self, name: str) -> Upstream | None:
        """The upstream serving `name` (exact id), by the cached listings and the config."""
        for upstream in self.upstreams:
            if name in upstream.model_ids():
                return upstream
        return None

    async def route(self, name: str | None) -> Upstream | None:
        """Where a request naming `name` goes: None for a local model (or none named)."""
        if not self.upstreams or not name:
            return None
        upstream = self.find(name)
        if upstream is None:
            return None
        local = self._local_now(name)
        if local is None:
            # A thread hop costs a routed request up to a GIL switch interval (5 ms) more on
            # its way to the first token, so only when the cheap answer is missing.
            local = await asyncio.to_thread(self._is_local, name)
        return None if local else upstream

    def listing(self, local: set[str]) -> list[dict[str, Any]]:
        """/v1/models entries of upstream models whose id no local model (or alias) takes."""
        seen = {name.lower() for name in local}
        out = []
        for upstream in self.upstreams:
            for mid in upstream.model_ids():
                if mid.lower() in seen:
                    continue
                seen.add(mid.lower())
                out.append({"id": mid, "object": "model", "created": 0,
                            "owned_by": f"upstream:{upstream.name}", "upstream": upstream.name})
        return out

    def status(self) -> list[dict[str, Any]]:
        return [u.describe() for u in self.upstreams]

    def unreachable(self, upstream: Upstream, reason: str) -> None:
        """A proxied request could not reach it: mark it down and check again at once."""
        upstream.health.up = False
        upstream.health.error = reason
        self.metrics.upstream_up.labels(upstream=upstream.name).set(0)
        upstream.wake.set()

    async def _watch(self, upstream: Upstream) -> None:
        while True:
            await self.check(upstream)
            upstream.wake.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(upstream.wake.wait(),
                                       REFRESH_S if upstream.health.up else RETRY_S)

    async def check(self, upstream: Upstream) -> None:
        """List its models once; records up/down, latency and the ids."""
        h = upstream.health
        was_up = h.up
        started = time.perf_counter()
        try:
            ids = await asyncio.wait_for(_list_models(upstream.client), CHECK_TIMEOUT_S)
        except (httpx.HTTPError, ValueError, OSError, TimeoutError, asyncio.TimeoutError) as e:
            h.up, h.error = False, describe_failure(e)
            log.log(logging.DEBUG if was_up is False else logging.WARNING,
                    "upstream %s (%s) is down: %s", upstream.name, upstream.url, h.error)
        else:
            if h.up is not True:
                log.info("upstream %s (%s) is up with %d models", upstream.name, upstream.url,
                         len(ids))
            h.up, h.error, h.model_ids = True, None, ids
            h.latency_ms = round((time.perf_counter() - started) * 1000, 2)
        h.last_check = time.time()
        self.metrics.upstream_up.labels(upstream=upstream.name).set(1 if h.up else 0)


async def _list_models(client: httpx.AsyncClient) -> tuple[str, ...]:
    async with client.stream("GET", "models") as response:
        if response.status_code != 200:
            raise ValueError(f"GET /models answered HTTP {response.status_code}")
        body = await read_bounded(response, MAX_LISTING_BYTES)
    data = json.loads(body).get("data")
    if not isinstance(data, list):
        raise ValueError("GET /models answered without a data list")
    ids = [m["id"] for m in data[:MAX_LISTED_MODELS] if isinstance(m, dict)
           and isinstance(m.get("id"), str) and 0 < len(m["id"]) <= MAX_ID_CHARS
           and m["id"].isprintable()]
    return tuple(dict.fromkeys(ids))


async def read_bounded(response: httpx.Response | UpstreamResponse, limit: int) -> bytes:
    """The body, or ValueError once it passes `limit` bytes (the rest is never read)."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise ValueError(f"the answer is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def describe_failure(e: BaseException) -> str:
    """One short line for a failed call: what happened, never a traceback."""
    if isinstance(e, (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException)):
        return "timed out"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({_root_cause(e)})"
    if isinstance(e, httpx.HTTPError):
        return f"{type(e).__name__}: {_root_cause(e)}"
    return str(e)[:200] or type(e).__name__


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = str(e).strip() or type(e).__name__
    return text.rsplit("] ", 1)[-1][:160]  # "[Errno 111] Connection refused" → the words
