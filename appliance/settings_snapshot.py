"""The settings for the CLI's quick commands (`models`, `du`, `rm`, `pull`) without importing
pydantic-settings, which costs about a second at every start on a busy two-core machine.

This is a memo, not a second reader of the configuration: the values are those of a `Settings`
that `load_settings` validated earlier, stored with everything they were built from
(every `APPLIANCE_*` variable, the TOML file's path and bytes, the inputs of the defaults, the
code of appliance/config.py). Any difference, or a missing or damaged memo, builds `Settings`
the one normal way (and stores a fresh memo).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from appliance import __version__

SNAPSHOT_FILE = "settings-snapshot.json"
MAX_BYTES = 256 * 1024  # settings are a few kB; a larger file is not ours
_PATHS = ("models_dir", "api_key_file")


class SettingsView:
    """Read-only attribute access to stored settings, as `Settings` offers them."""

    def __init__(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key in _PATHS and value is not None:
                value = Path(value)
            elif key == "models":
                value = {mid: _Section(section) for mid, section in value.items()}
            setattr(self, key, value)

    def model_overrides(self, model_id: str) -> Any:
        models: dict[str, Any] = getattr(self, "models", {})
        return models.get(model_id.lower()) or _Section({})

    def read_api_key(self) -> str | None:
        if getattr(self, "api_key_file", None) is None:
            return None
        from appliance.config import Settings

        # The one implementation; only a configured key file pays for importing it.
        return Settings.read_api_key(self)  # type: ignore[arg-type]


class _Section:
    """One `[models.ID]` section."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.context_length = values.get("context_length")
        self.enable_thinking = values.get("enable_thinking")
        self.gpu_layers = values.get("gpu_layers")
        self.pin = bool(values.get("pin", False))


def _config_file() -> Path:
    # The same rule as appliance.config.default_config_file (checked by the tests).
    return Path(os.environ.get("APPLIANCE_CONFIG") or Path(
        os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "qwen-appliance"
        / "config.toml")


def inputs(overrides: dict[str, Any]) -> list[Any]:
    """Everything `load_settings(**overrides)` depends on, as JSON values."""
    environment = sorted((k.upper(), v) for k, v in os.environ.items()
                         if k.upper().startswith("APPLIANCE_"))
    config = _config_file()
    try:
        config_bytes = config.read_bytes().hex() if config.is_file() else "absent"
    except OSError as e:
        config_bytes = f"unreadable {e.errno}"
    code = Path(__file__).with_name("config.py")
    try:
        stat = code.stat()
        code_key = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        code_key = []
    # Round-tripped through JSON, so it compares equal to what the memo file holds.
    return json.loads(json.dumps([
        __version__, code_key, sys.version, environment, str(config), config_bytes,
        os.environ.get("XDG_DATA_HOME"), str(Path.home()), os.cpu_count(),
        sorted((k, str(v)) for k, v in overrides.items() if v is not None),
    ]))


def snapshot_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "qwen-appliance" / SNAPSHOT_FILE


def load(overrides: dict[str, Any]) -> SettingsView | None:
    """The stored settings when they were made from exactly these inputs, else None."""
    path = snapshot_path()
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["inputs"] != inputs(overrides) or not isinstance(data["values"], dict):
            return None
        return SettingsView(data["values"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def store(settings: Any, overrides: dict[str, Any]) -> None:
    """Remember validated settings for the next quick command (a failure only costs speed)."""
    path = snapshot_path()
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"inputs": inputs(overrides), "values": settings.model_dump(mode="json")}
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(temp, path)
    except (OSError, TypeError, ValueError):
        with contextlib.suppress(OSError):
            temp.unlink()
