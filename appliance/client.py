"""A small client of the daemon's control API, shared by the CLI and the tray.

Standard library only (urllib): the tray polls it every second or two and must stay small.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from appliance.config import Settings


class DaemonUnavailable(Exception):
    """The daemon is not running or not answering at the URL."""


class DaemonError(Exception):
    """The daemon answered with an error; the message is the API's."""


def base_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


class DaemonClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Never route localhost calls through a proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, path: str, timeout: float | None = None) -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, method=method, headers=self._headers,
                                         data=b"" if method == "POST" else None)
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                body, status = response.read(), response.status
        except urllib.error.HTTPError as e:
            body, status = e.read(), e.code
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DaemonUnavailable(f"the daemon is not running at {self.url} ({reason})") from None
        try:
            data = json.loads(body)
        except ValueError:
            raise DaemonError(f"unexpected answer from {self.url}{path}: HTTP {status}") from None
        if status >= 400 and path != "/health":
            message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
            raise DaemonError(message or f"HTTP {status}")
        return data

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/api/status")

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/api/models")

    def load(self, model_id: str) -> dict[str, Any]:
        # Quoted: an id comes from a file name, which may hold spaces or other URL characters.
        path = f"/api/models/{urllib.parse.quote(model_id, safe='')}/load"
        return self._call("POST", path, timeout=600)

    def unload(self) -> dict[str, Any]:
        return self._call("POST", "/api/unload", timeout=120)

    def close(self) -> None:
        pass  # one connection per call: nothing held open
