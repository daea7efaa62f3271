"""Request bodies of the Ollama API (`/api/chat`, `/api/generate`, ...), validated by pydantic.

Every field a client controls is bounded. `options` takes Ollama's documented option names with
their types; options we do not know are ignored, as Ollama ignores them, but only when they are
small JSON scalars, so an unknown key cannot smuggle a megabyte of nesting past the bounds.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from appliance.api.schemas import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOOLS, RequestBody
from appliance.errors import InvalidValue

MAX_OPTIONS = 64
MAX_OPTION_KEY = 64
MAX_OPTION_TEXT = 1000
# Longer than this is "forever": it also keeps asyncio's timer arithmetic finite.
KEEP_ALIVE_FOREVER_S = 100 * 365 * 86400
_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
           "h": 3600.0}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive as seconds: "5m", "1h30m", "300", 300; negative: forever (-1.0);
    None: the configured default. Raises ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("keep_alive is a duration such as \"5m\" or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)  # a bare number of seconds, as a string
        except ValueError:
            parts = _GO_DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"keep_alive {text[:40]!r} is not a duration (e.g. \"5m\", "
                                 "\"1h\", \"30s\", 0 to unload, -1 to keep loaded)") from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    if math.isnan(seconds):
        raise ValueError("keep_alive is not a number")
    if seconds < 0 or seconds > KEEP_ALIVE_FOREVER_S:
        return -1.0
    return seconds


class Options(BaseModel):
    """Ollama's `options`; the ones the engine does not have are accepted with no effect."""

    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    num_predict: int | None = Field(None, ge=-2, le=2**31 - 1)  # -1: no limit, -2: fill context
    stop: list[str] | None = None
    num_ctx: int | None = Field(None, ge=1, le=2**24)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Known to Ollama, typed as Ollama types them, without effect here (the engine's penalty
    # window is 64 tokens, Ollama's default repeat_last_n; threads, batch, GPU layers and
    # memory mapping are daemon settings, not per request).
    repeat_last_n: int | None = Field(None, ge=-1, le=2**31 - 1)
    num_keep: int | None = Field(None, ge=-1, le=2**31 - 1)
    typical_p: float | None = Field(None, ge=0, le=1)
    mirostat: int | None = Field(None, ge=0, le=2)
    mirostat_tau: float | None = Field(None, ge=0, le=100)
    mirostat_eta: float | None = Field(None, ge=0, le=100)
    tfs_z: float | None = Field(None, ge=0, le=100)
    penalize_newline: bool | None = None
    num_batch: int | None = Field(None, ge=1, le=2**31 - 1)
    num_gpu: int | None = Field(None, ge=-1, le=2**31 - 1)
    main_gpu: int | None = Field(None, ge=0, le=1024)
    num_thread: int | None = Field(None, ge=0, le=4096)
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # pydantic says "Input should be a valid dictionary"
        if len(data) > MAX_OPTIONS:
            raise ValueError(f"at most {MAX_OPTIONS} options")
        for key, value in data.items():
            if len(key) > MAX_OPTION_KEY:
                raise ValueError(f"option names are at most {MAX_OPTION_KEY} characters")
            if key == "stop":
                continue  # checked by its own validator
            if not _small_scalar(value):
                raise ValueError(f"option {key[:MAX_OPTION_KEY]!r} must be a number, a boolean "
                                 f"or a string of at most {MAX_OPTION_TEXT} characters")
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if isinstance(stops, list):
            if len(stops) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
            if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops):
                raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return stops


def _small_scalar(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, str) and len(value) <= MAX_OPTION_TEXT


class ToolCallFunction(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCallIn(_Lenient):
    function: ToolCallFunction


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS)
    tool_name: str | None = Field(None, max_length=256)


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolDef(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


Format = Literal["", "json"] | dict[str, Any] | None
Think = bool | Literal["high", "medium", "low"] | None


class _KeepAlive(RequestBody):
    """Ollama's per-request `keep_alive`."""

    keep_alive: str | float | None = Field(None, union_mode="left_to_right")

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str) and len(value) > 64:
            raise ValueError("keep_alive is at most 64 characters")
        keep_alive_seconds(value)  # raises ValueError with the reason
        return value

    @property
    def keep_alive_s(self) -> float | None:
        return keep_alive_seconds(self.keep_alive)


class _Generating(_KeepAlive):
    """What /api/chat and /api/generate share."""

    model: str = Field("", max_length=256)
    format: Format = None
    options: Options | None = None
    stream: bool = True
    think: Think = None
    # They change what the answer means: refused until supported, never ignored.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _unsupported(self) -> _Generating:
        if self.logprobs or self.top_logprobs:
            raise InvalidValue("logprobs are not supported yet", param="logprobs")
        return self


    @property
    def thinking(self) -> bool | None:
        """Qwen3 thinks or not; the "high"/"medium"/"low" levels of other models mean on."""
        return None if self.think is None else self.think is not False

    @property
    def opts(self) -> Options:
        return self.options or Options()


class ChatRequest(_Generating):
    messages: list[Message] = Field(default_factory=list)
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)


class GenerateRequest(_Generating):
    prompt: str = ""
    suffix: str | None = None
    images: list[str] | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    context: list[int] | None = None


class ModelRequest(RequestBody):
    """/api/show, /api/delete, /api/pull, /api/embed: a model by name (`name` in old clients)."""

    model: str = Field("", max_length=256)
    name: str = Field("", max_length=256)

    @property
    def model_name(self) -> str:
        return self.model or self.name


class EmbedRequest(ModelRequest, _KeepAlive):
    """/api/embed (`input`: a string or strings) and the legacy /api/embeddings (`prompt`)."""

    input: str | list[str] | None = None
    prompt: str | None = None
    dimensions: int | None = Field(None, ge=1, le=65536)
    truncate: bool = True

