"""Request bodies of the OpenAI-compatible API, validated by pydantic (errors → 400)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from appliance.errors import InvalidValue

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 500
MAX_TOOLS = 128
MAX_CHOICES = 4
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
TOKEN_ID = re.compile(r"^-?[0-9]{1,10}$")  # ASCII digits only: "²".isdigit() is True


class _Lenient(BaseModel):
    # Clients send fields we do not use (user, metadata, store...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


def unpaired_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate ("\\ud800" in JSON): such a
    string cannot be encoded to UTF-8, so the tokenizer could never take it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        found = unpaired_surrogate(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class RequestBody(_Lenient):
    """A whole request body: refuses strings that are not valid Unicode, naming the field."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = unpaired_surrogate(data)
        if where:  # not a ValueError: pydantic would lose the field's name
            raise InvalidValue(f"{where} contains an unpaired UTF-16 surrogate, which is not "
                               "valid Unicode", param=where)
        return data


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content parts of type {part.type!r} are not supported")
            texts.append(part.text or "")
        return "".join(texts)


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: dict[str, str]

    @field_validator("function")
    @classmethod
    def _names_a_function(cls, value: dict[str, str]) -> dict[str, str]:
        if not value.get("name"):
            raise ValueError("tool_choice.function needs the name of a tool")
        return value


class SamplingFields(RequestBody):
    model: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repeat_penalty: float = Field(1.0, gt=0, le=10)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    # Each choice takes a slot of its own (they share the prompt's KV cells).
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    # Fields that change what the answer means: refused until supported, never ignored.
    best_of: Any = None

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingFields:
        if self.best_of not in (None, 1):
            raise InvalidValue("best_of is not supported (one choice per request)",
                               param="best_of")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not TOKEN_ID.match(key):
                raise ValueError(f"logit_bias keys are token ids, got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values must be between -100 and 100")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None  # a shortcut some clients send at the top level
    # Thinking tokens before the engine closes </think> itself (Qwen's own API has this field).
    thinking_budget: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise InvalidValue("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise InvalidValue("tool_choice asks for a tool call, but tools is empty",
                               param="tool_choice")
        return self

    def logprobs_top(self) -> int | None:
        """None: no logprobs; k: each token's logprob and the k likeliest tokens."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt]  # strict: true or 1.0 is no token id
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # For a prompt that opens <think> itself: thinking tokens before the engine closes it.
    thinking_budget: int | None = Field(None, ge=1, le=2**31 - 1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and isinstance(value[0], str) and len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        return value

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise InvalidValue("suffix (fill-in-the-middle) is not supported", param="suffix")
        if self.echo and isinstance(self.prompt, list) and isinstance(self.prompt[0], int):
            raise InvalidValue("echo is supported for text prompts only", param="echo")
        if self.echo and self.logprobs is not None:
            raise InvalidValue("logprobs of the prompt (echo with logprobs) are not supported",
                               param="logprobs")
        return self
