"""A small client of the daemon's control API, shared by the CLI and the tray.

Standard library only (urllib): the tray polls it every second or two and must stay small.
urllib is imported on first use: `appliance models` with the daemon stopped never pays for it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:  # importing the settings costs the CLI most of a second; only types here
    import urllib.request

    from appliance.config import Settings


class DaemonUnavailable(Exception):
    """The daemon is not running or not answering at the URL."""


class DaemonTimeout(DaemonUnavailable):
    """The daemon took the connection but did not answer in time: busy, not gone."""


class DaemonError(Exception):
    """The daemon answered with an error; the message is the API's."""


def base_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


PULL_IDLE_S = 120.0  # a pull sends a line at least every few seconds; silence this long is a fault


def _answer(body: bytes, status: int, url: str, health: bool) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise DaemonError(f"unexpected answer from {url}: HTTP {status}") from None
    if status >= 400 and not health:
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        raise DaemonError(message or f"HTTP {status}")
    return data


class DaemonClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._seen_listening = False

    @cached_property
    def _opener(self) -> urllib.request.OpenerDirector:
        import urllib.request

        # Never route localhost calls through a proxy from the environment.
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _refuse_if_not_listening(self, timeout: float) -> None:
        """A plain TCP connect before the first call: a stopped daemon is told apart without
        loading urllib (a tenth of a second of a CLI command's start)."""
        if self._seen_listening:
            return
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "127.0.0.1", port), timeout).close()
        except OSError as e:
            raise DaemonUnavailable(f"the daemon is not running at {self.url} ({e})") from None
        self._seen_listening = True

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> urllib.request.Request:
        import urllib.request

        headers = dict(self._headers)
        data = b"" if method == "POST" else None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return urllib.request.Request(self.url + path, method=method, headers=headers, data=data)

    def _call(self, method: str, path: str, timeout: float | None = None,
              body: dict[str, Any] | None = None) -> dict[str, Any]:
        import urllib.error

        self._refuse_if_not_listening(timeout or self.timeout)
        request = self._request(method, path, body)
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                body_bytes, status = response.read(), response.status
        except urllib.error.HTTPError as e:
            body_bytes, status = e.read(), e.code
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise DaemonTimeout(f"the daemon at {self.url} did not answer in time") from None
            raise DaemonUnavailable(f"the daemon is not running at {self.url} ({reason})") from None
        return _answer(body_bytes, status, self.url + path, path == "/health")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/api/status")

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/api/models")

    def load(self, model_id: str) -> dict[str, Any]:
        # Quoted: an id comes from a file name, which may hold spaces or other URL characters.
        path = f"/api/models/{quote(model_id, safe='')}/load"
        return self._call("POST", path, timeout=600)

    def unload(self, model_id: str | None = None) -> dict[str, Any]:
        """Unload one model (by id or alias), or every resident model when None."""
        if model_id is None:
            return self._call("POST", "/api/unload", timeout=120)
        path = f"/api/models/{quote(model_id, safe='')}/unload"
        return self._call("POST", path, timeout=120)

    def delete_model(self, model_id: str, force: bool = False) -> dict[str, Any]:
        path = f"/api/models/{quote(model_id, safe='')}"
        return self._call("DELETE", path + ("?force=true" if force else ""), timeout=120)

    def library(self) -> dict[str, Any]:
        """Installed models with their fit, and pulls running now."""
        return self._call("GET", "/api/library")

    def pull(self, ref: str, quant: str | None = None) -> Iterator[dict[str, Any]]:
        """Start (or join) a pull in the daemon and yield its progress lines until it ends."""
        body: dict[str, Any] = {"model": ref}
        if quant:
            body["quant"] = quant
        import urllib.error

        request = self._request("POST", "/api/models/pull", body)
        try:
            response = self._opener.open(request, timeout=PULL_IDLE_S)
        except urllib.error.HTTPError as e:
            _answer(e.read(), e.code, self.url, False)
            raise DaemonError(f"HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DaemonUnavailable(f"the daemon is not running at {self.url} ({reason})") from None
        with response:
            for raw in response:
                if raw.strip():
                    line = json.loads(raw)
                    yield line
                    if "error" in line:
                        raise DaemonError(line["error"])

    def close(self) -> None:
        pass  # one connection per call: nothing held open
