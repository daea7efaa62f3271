"""All settings in one object: `APPLIANCE_*` environment variables over a TOML file over defaults.

The TOML file is `$XDG_CONFIG_HOME/qwen-appliance/config.toml` (or `APPLIANCE_CONFIG`). Built once
at start-up and passed to whatever needs it; never a module-level global.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_PORT = 8471
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def xdg_dir(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / fallback) / "qwen-appliance"


def default_config_file() -> Path:
    return Path(os.environ.get("APPLIANCE_CONFIG") or xdg_dir("XDG_CONFIG_HOME", ".config")
                / "config.toml")


class ModelOverrides(BaseSettings):
    """Per-model settings, keyed by model id under `[models.ID]` in the TOML file."""

    context_length: int | None = Field(None, description="context tokens per request slot")
    enable_thinking: bool | None = Field(None, description="Qwen3 thinking on by default")
    gpu_layers: int | None = Field(None, description="force this many layers on the GPU")


class Settings(BaseSettings):
    """Every setting of the daemon; each can be set as APPLIANCE_<NAME> or in config.toml."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", extra="ignore",
                                      env_nested_delimiter="__")

    host: str = Field("127.0.0.1", description="address to bind; non-loopback needs api_key_file")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port of the API")
    models_dir: Path = Field(default_factory=lambda: xdg_dir("XDG_DATA_HOME", ".local/share")
                             / "models", description="folder scanned for .gguf models")
    default_model: str | None = Field(None, description="model loaded at start-up")
    aliases: dict[str, str] = Field(default_factory=dict, description="extra name → model id")
    models: dict[str, ModelOverrides] = Field(default_factory=dict,
                                              description="per-model overrides")
    api_key_file: Path | None = Field(None, description="file (mode 0600) holding the bearer key")
    allowed_hosts: list[str] = Field(default_factory=list,
                                     description="Host header names accepted besides loopback")
    cors_origins: list[str] = Field(default_factory=list,
                                    description="browser origins allowed; empty means CORS off")
    context_length: int = Field(8192, ge=256, description="default context tokens per request")
    enable_thinking: bool = Field(True, description="Qwen3 thinking default for chat")
    parallel: int = Field(4, ge=1, le=64, description="sequences decoded together (slots)")
    max_queue: int = Field(64, ge=0, description="requests waiting beyond the slots; then 503")
    keep_alive_s: float = Field(900.0, ge=0,
                                description="unload after this many idle seconds (0: never)")
    switch_wait_s: float = Field(30.0, ge=0,
                                 description="how long a switch waits for in-flight requests")
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                         description="CPU threads for decoding")
    engine_nice: int = Field(5, ge=0, le=19,
                             description="nice value of the decoding threads (0: normal)")
    gpu: str = Field("auto", description="auto (NVML) or none")
    vram_margin_mib: int = Field(512, ge=0, description="VRAM left free for other programs")
    flash_attn: bool = Field(True, description="flash attention where the build supports it")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body accepted")
    max_tokens_default: int | None = Field(None, description="cap when a request sets none")
    log_level: str = Field("info", description="debug, info, warning or error")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=default_config_file())
        return init_settings, env_settings, toml

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be debug, info, warning or error")
        return value.lower()

    @model_validator(mode="after")
    def _non_loopback_needs_key(self) -> Settings:
        if not is_loopback(self.host) and self.api_key_file is None:
            raise ValueError(f"host {self.host} is reachable from other machines: "
                             "set api_key_file (APPLIANCE_API_KEY_FILE) to bind there")
        return self

    def model_overrides(self, model_id: str) -> ModelOverrides:
        return self.models.get(model_id) or ModelOverrides()

    def read_api_key(self) -> str | None:
        """The bearer key, refusing a key file that others can read."""
        if self.api_key_file is None:
            return None
        path = self.api_key_file.expanduser()
        if path.stat().st_mode & 0o077:
            raise ValueError(f"{path} is readable by other users: chmod 600 it")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"{path} is empty")
        return key


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def describe_settings() -> str:
    """`APPLIANCE_*` variables with their descriptions, for `appliance serve --help`."""
    lines = [f"  {'APPLIANCE_CONFIG':<30} the TOML file (default {default_config_file()})"]
    for name, info in Settings.model_fields.items():
        if name == "model_config":
            continue
        lines.append(f"  {'APPLIANCE_' + name.upper():<30} {info.description or ''}")
    return "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Settings from overrides (CLI flags), the environment and the TOML file."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
