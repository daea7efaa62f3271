"""All settings in one object: `APPLIANCE_*` environment variables over a TOML file over defaults.

The TOML file is `$XDG_CONFIG_HOME/qwen-appliance/config.toml` (or `APPLIANCE_CONFIG`). Built once
at start-up and passed to whatever needs it; never a module-level global.

A key the daemon does not know, in the file or in a `[models.ID]` section, is an error naming the
key (a typo such as `contex_length` would otherwise be ignored in silence). `APPLIANCE_*`
variables that name no setting are left alone: the installer and the tests use some of their own
(`APPLIANCE_CONFIG`, `APPLIANCE_WHEELHOUSE`). Any mistake becomes one `SettingsError` line that
names the file, key or variable.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

if sys.version_info >= (3, 11):
    from tomllib import TOMLDecodeError
else:  # pydantic-settings reads TOML with tomli before Python 3.11
    from tomli import TOMLDecodeError

DEFAULT_PORT = 8471
MAX_RPC_WORKERS = 16  # GGML_RPC_MAX_SERVERS
# Context tokens per slot, or "auto": sized to the memory there is (appliance.context_sizing).
ContextLength = Annotated[int, Field(ge=256, le=2**24)] | Literal["auto"]
# The K and V cache's type; "auto" picks f16, or q8_0 where f16 would not fit (context_sizing).
KvCacheType = Literal["auto", "f16", "q8_0", "q4_0"]
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def xdg_dir(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / fallback) / "qwen-appliance"


def default_config_file() -> Path:
    return Path(os.environ.get("APPLIANCE_CONFIG") or xdg_dir("XDG_CONFIG_HOME", ".config")
                / "config.toml")


class SettingsError(ValueError):
    """A setting the user must fix; one line naming the file, key or variable, with a hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class ModelOverrides(BaseModel):
    """Per-model settings, keyed by model id under `[models.ID]` in the TOML file."""

    # A plain model, not BaseSettings: that would read unprefixed CONTEXT_LENGTH=... from the
    # environment into every model's settings.
    model_config = ConfigDict(extra="forbid")

    context_length: ContextLength | None = Field(
        None, description="context tokens per slot, or auto (sized to free memory)")
    kv_cache_type: KvCacheType | None = Field(
        None, description="KV cache type: auto, f16, q8_0 or q4_0 (quantized needs flash_attn)")
    enable_thinking: bool | None = Field(None, description="Qwen3 thinking on by default")
    gpu_layers: int | None = Field(None, ge=0, description="force this many layers on the GPU")
    pin: bool = Field(False, description="never unload this model when idle or for room")
    draft: str | None = Field(None, max_length=200,
                              description="draft model id for speculative decoding; \"\" turns "
                              "it off (unset: an installed Qwen3-0.6B drafts for Qwen3 models)")


MAX_UPSTREAM_MODELS = 256  # ids listed under one [upstreams.NAME]


class UpstreamSettings(BaseModel):
    """Another OpenAI-compatible server under `[upstreams.NAME]`, whose models we route to it."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="OpenAI-compatible base URL, e.g. http://gpu-box:8000/v1")
    api_key_file: Path | None = Field(None, description="file (mode 0600) with its bearer key")
    models: Literal["*"] | list[str] = Field(
        "*", description='ids routed there, or "*" for every model it lists')
    timeout_s: float = Field(300.0, gt=0, le=3600,
                             description="connect, and the longest wait for its next bytes")
    max_response_bytes: int = Field(64 * 2**20, ge=2**16, le=2**31,
                                    description="largest non-streamed answer read from it")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return upstream_url(value)

    @field_validator("models")
    @classmethod
    def _model_ids(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            return value
        if not value or len(value) > MAX_UPSTREAM_MODELS:
            raise ValueError(f'list 1 to {MAX_UPSTREAM_MODELS} model ids, or "*"')
        for mid in value:
            if not mid or len(mid) > 256 or not mid.isprintable():
                raise ValueError(f"model id {mid[:40]!r} is empty, too long or not printable")
        return list(dict.fromkeys(value))

    def read_api_key(self) -> str | None:
        """Its bearer key, refusing a key file that others can read."""
        return None if self.api_key_file is None else read_key_file(self.api_key_file)


class Settings(BaseSettings):
    """Every setting of the daemon; each can be set as APPLIANCE_<NAME> or in config.toml."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", extra="forbid",
                                      env_nested_delimiter="__")

    host: str = Field("127.0.0.1", description="address to bind; non-loopback needs api_key_file")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port of the API")
    ollama_port: int | None = Field(None, ge=1, le=65535,
                                    description="also serve on this port (11434 for apps that "
                                    "only know Ollama's address); off when unset")
    models_dir: Path = Field(default_factory=lambda: xdg_dir("XDG_DATA_HOME", ".local/share")
                             / "models", description="folder scanned for .gguf models")
    default_model: str | None = Field(None, description="model loaded at start-up")
    aliases: dict[str, str] = Field(default_factory=dict, description="extra name → model id")
    models: dict[str, ModelOverrides] = Field(
        default_factory=dict, description="per-model overrides under [models.ID] (any case)")
    api_key_file: Path | None = Field(None, description="file (mode 0600) holding the bearer key")
    upstreams: dict[str, UpstreamSettings] = Field(
        default_factory=dict, description="other OpenAI-compatible servers under "
        "[upstreams.NAME] (url, api_key_file, models, timeout_s, max_response_bytes)")
    allowed_hosts: list[str] = Field(default_factory=list,
                                     description="Host header names accepted besides loopback")
    cors_origins: list[str] = Field(default_factory=list,
                                    description="browser origins (scheme://host[:port]) allowed; "
                                    "empty means CORS off")
    context_length: ContextLength = Field(
        "auto", description="context tokens per slot (each of `parallel`), or auto: the most "
        "that keeps every layer on the GPU (CPU only: up to 8192)")
    kv_cache_type: KvCacheType = Field(
        "auto", description="KV cache type for chat models: auto (f16, q8_0 when f16 would not "
        "fit), f16, q8_0 or q4_0; quantized types need flash_attn")
    enable_thinking: bool = Field(True, description="Qwen3 thinking default for chat")
    parallel: int = Field(4, ge=1, le=64, description="sequences decoded together (slots)")
    max_queue: int = Field(64, ge=0, description="requests waiting beyond the slots; then 503")
    keep_alive_s: float = Field(900.0, ge=0,
                                description="unload after this many idle seconds (0: never)")
    keep_alive_embedding_s: float = Field(
        1800.0, ge=0, description="the same for embedding models (0: never)")
    max_chat_models: int = Field(1, ge=1, le=16,
                                 description="chat models resident at once (memory permitting)")
    switch_wait_s: float = Field(30.0, ge=0,
                                 description="how long a switch waits for in-flight requests")
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                         description="CPU threads for decoding")
    engine_nice: int = Field(5, ge=0, le=19,
                             description="nice value of the decoding threads (0: normal)")
    cpu_turns: bool = Field(False,
                            description="resident models on the CPU take turns to decode "
                                        "(measured on 2 cores: no better for chat beside an "
                                        "embedding batch, the batch slower; see README)")
    gpu: str = Field("auto", description="auto (NVML) or none")
    draft_max: int = Field(8, ge=0, le=32,
                           description="most tokens a draft model proposes per step (0: never "
                           "draft)")
    vram_margin_mib: int = Field(512, ge=0, description="VRAM left free for other programs")
    flash_attn: bool = Field(True, description="flash attention where the build supports it")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body accepted")
    max_tokens_default: int | None = Field(None, description="cap when a request sets none")
    log_level: str = Field("info", description="debug, info, warning or error")
    rpc_workers: list[str] = Field(
        default_factory=list, description="llama.cpp RPC workers (host:port, `appliance "
        "worker` there) whose memory holds layers of chat models; trusted network only")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _toml_source(settings_cls, default_config_file())

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be debug, info, warning or error")
        return value.lower()

    @field_validator("models", mode="before")
    @classmethod
    def _lower_case_ids(cls, value: Any) -> Any:
        # Model ids are lower-case file stems; [models."Qwen3-8B-Q4_K_M"] must still apply.
        if not isinstance(value, dict):
            return value
        lowered: dict[str, Any] = {}
        for key, section in value.items():
            mid = str(key).lower()
            if mid in lowered:
                raise ValueError(f"two sections name model {mid} (ids ignore case): keep one")
            lowered[mid] = section
        return lowered

    @field_validator("cors_origins")
    @classmethod
    def _origins_only(cls, value: list[str]) -> list[str]:
        return [cors_origin(origin) for origin in value]

    @field_validator("rpc_workers")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        endpoints = [rpc_endpoint(item) for item in value]
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("a worker is listed twice")
        if len(endpoints) > MAX_RPC_WORKERS:
            raise ValueError(f"at most {MAX_RPC_WORKERS} workers (llama.cpp's limit)")
        return endpoints

    @model_validator(mode="after")
    def _two_ports(self) -> Settings:
        if self.ollama_port == self.port:
            raise ValueError(f"ollama_port and port are both {self.port}: unset ollama_port, or "
                             "give it another port (Ollama's is 11434)")
        return self

    @model_validator(mode="after")
    def _quantized_kv_needs_flash_attention(self) -> Settings:
        # llama.cpp stores a quantized V cache only with flash attention (it refuses the context)
        if self.flash_attn:
            return self
        chosen = [("kv_cache_type", self.kv_cache_type)] + [
            (f"models.{mid}.kv_cache_type", o.kv_cache_type) for mid, o in self.models.items()]
        for key, value in chosen:
            if value in ("q8_0", "q4_0"):
                raise ValueError(f"{key} = {value} needs flash attention, and flash_attn is "
                                 "false: set flash_attn = true, or kv_cache_type = \"f16\"")
        return self

    @model_validator(mode="after")
    def _non_loopback_needs_key(self) -> Settings:
        if not is_loopback(self.host) and self.api_key_file is None:
            raise ValueError(f"host {self.host} is reachable from other machines: "
                             "set api_key_file (APPLIANCE_API_KEY_FILE) to bind there")
        return self

    def model_overrides(self, model_id: str) -> ModelOverrides:
        return self.models.get(model_id.lower()) or ModelOverrides()

    def read_api_key(self) -> str | None:
        """The bearer key, refusing a key file that others can read."""
        return None if self.api_key_file is None else read_key_file(self.api_key_file)

    def read_upstream_keys(self) -> dict[str, str | None]:
        """Each upstream's key; a ValueError or OSError names the upstream and the file."""
        keys = {}
        for name, upstream in self.upstreams.items():
            try:
                keys[name] = upstream.read_api_key()
            except (OSError, ValueError) as e:
                raise ValueError(f"upstreams.{name}.api_key_file: "
                                 f"{getattr(e, 'strerror', None) or e}") from None
        return keys


def read_key_file(path: Path) -> str:
    """A key from a file only its owner can read (mode 0600 or stricter)."""
    path = path.expanduser()
    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path} is readable by other users: chmod 600 it")
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path} is empty")
    return key


def upstream_url(url: str) -> str:
    """An upstream's base URL: http or https, a host, no credentials, query or fragment."""
    refusal = (f"upstream url {url[:100]!r} is not an http(s) base URL such as "
               "http://gpu-box:8000/v1 (credentials go in api_key_file)")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise ValueError(refusal) from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc
            or parts.query or parts.fragment):
        raise ValueError(refusal)
    return url.strip().rstrip("/")


_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


def cors_origin(origin: str) -> str:
    """`origin` as browsers send it (scheme://host[:port]); anything else is refused."""
    # `*` would let every web page read the API; `null` is what sandboxed frames and file://
    # pages send, so allowing it allows any page that chooses to be one of those.
    refusal = (f"CORS origin {origin!r} is not scheme://host[:port] "
               "(e.g. http://localhost:3000; never *, null, a path or a trailing slash)")
    try:
        parts = urlsplit(origin.strip())
        port = parts.port  # raises ValueError on a port that is not a number in range
    except ValueError:
        raise ValueError(refusal) from None
    if (not _SCHEME.fullmatch(parts.scheme or "") or not parts.hostname or parts.path
            or parts.query or parts.fragment or "@" in parts.netloc
            or origin.strip().endswith(":")):
        raise ValueError(refusal)
    host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    # Browsers send the scheme and host in lower case; CORSMiddleware compares exactly.
    return f"{parts.scheme}://{host.lower()}" + (f":{port}" if port is not None else "")


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*", re.IGNORECASE)


def rpc_endpoint(endpoint: str) -> str:
    """`endpoint` as host:port for llama.cpp's RPC client, or a ValueError saying why not."""
    host, sep, port = endpoint.strip().rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"RPC worker {endpoint!r} is not host:port (e.g. 192.168.1.20:50052)")
    # llama.cpp splits the endpoint at its first colon: an IPv6 address cannot be given.
    if ":" in host or host.startswith("["):
        raise ValueError(f"RPC worker {endpoint!r}: llama.cpp's RPC client takes no IPv6 "
                         "address; use an IPv4 address or a host name")
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"RPC worker {endpoint!r}: {host!r} is not a host name or address")
    return f"{host.lower()}:{int(port)}"


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
    """Settings from overrides (CLI flags), the environment and the TOML file.

    Raises SettingsError (one line, naming where the bad value came from) for any mistake.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        raise _explain(e, given) from None


def _toml_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    # A missing file means defaults; anything else that is not a readable file is a mistake
    # (pydantic-settings would skip a folder in silence).
    if path.exists() and not path.is_file():
        raise SettingsError(f"cannot read {path}: not a file", "set APPLIANCE_CONFIG to a file")
    try:
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    except TOMLDecodeError as e:
        raise SettingsError(f"{path} is not valid TOML: {e}",
                            "fix that line, or move the file away to use the defaults") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}",
                            "make it a readable UTF-8 file, or set APPLIANCE_CONFIG") from None


def _explain(error: ValidationError, given: dict[str, Any]) -> SettingsError:
    """The first validation error as one line saying which file, key or variable to fix."""
    first = error.errors()[0]
    loc = tuple(str(part) for part in first.get("loc", ()))
    key = ".".join(loc)
    where = _origin(loc, given)
    more = error.error_count() - 1
    tail = f" (and {more} more)" if more else ""
    if first["type"] == "extra_forbidden":
        known = (ModelOverrides.model_fields if loc[:1] == ("models",) and len(loc) == 3
                 else UpstreamSettings.model_fields if loc[:1] == ("upstreams",) and len(loc) == 3
                 else Settings.model_fields)
        close = difflib.get_close_matches(loc[-1], list(known), n=1)
        return SettingsError(f"unknown setting {key} in {where}{tail}",
                             f"did you mean {close[0]}?" if close
                             else "`appliance serve --help` lists the settings")
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if not loc:  # a check across settings; its message names them
        return SettingsError(f"bad settings: {message}{tail}",
                             "check APPLIANCE_* variables and " + str(default_config_file()))
    return SettingsError(f"bad setting {key} in {where}: {message}{tail}",
                         "`appliance serve --help` lists the settings")


def _origin(loc: tuple[str, ...], given: dict[str, Any]) -> str:
    """Where the value at `loc` came from, in the order the sources win."""
    if not loc:
        return "settings"
    name = loc[0].lower()
    if name in given:
        return "the command line"
    variable = f"APPLIANCE_{name}".upper()
    for env in os.environ:
        if env.upper() == variable or env.upper().startswith(variable + "__"):
            return env
    return str(default_config_file())
