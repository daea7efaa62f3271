"""A small client of the daemon's control API, shared by the CLI and the tray."""

from __future__ import annotations

from typing import Any

import httpx

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
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, timeout: float | None = None) -> dict[str, Any]:
        try:
            kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise DaemonUnavailable(f"the daemon is not running at {self.url} "
                                    f"({type(e).__name__})") from None
        try:
            data = response.json()
        except ValueError:
            raise DaemonError(f"unexpected answer from {self.url}{path}: "
                              f"HTTP {response.status_code}") from None
        if response.status_code >= 400 and path != "/health":
            message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
            raise DaemonError(message or f"HTTP {response.status_code}")
        return data

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/api/status")

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/api/models")

    def load(self, model_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/models/{model_id}/load", timeout=600)

    def unload(self) -> dict[str, Any]:
        return self._call("POST", "/api/unload", timeout=120)

    def close(self) -> None:
        self._http.close()
