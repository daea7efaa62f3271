"""Anthropic Messages request bodies, and their translation into the chat the template renders.

Every field a client controls is bounded here; a content block or option we cannot honour
(images, server tools, an assistant prefill) is refused with a 400 that names it, never ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.api.core import Sampling
from appliance.api.schemas import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOOLS,
    FunctionDef,
    RequestBody,
    ResponseFormat,
    Tool,
)
from appliance.errors import InvalidValue

MAX_MESSAGES = 10_000
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")  # Anthropic's own rule for custom tools
UNSUPPORTED_BLOCKS = {
    "image": "image blocks are not supported: the model reads text only",
    "document": "document blocks are not supported: send the text as a text block",
    "search_result": "search_result blocks are not supported",
    "container_upload": "container_upload blocks are not supported",
}


class _Lenient(BaseModel):
    # cache_control, citations and fields newer clients add: accepted and ignored.
    model_config = ConfigDict(extra="ignore")


def text_or_blocks(value: Any) -> Any:
    """Checked before the union, whose own error would blame only its first branch."""
    if value is not None and not isinstance(value, str) and not (
            isinstance(value, list) and all(isinstance(v, dict) for v in value)):
        raise ValueError("expected a string or a list of content blocks (objects with a type)")
    return value


# -- content blocks ----------------------------------------------------------------------------


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: str = Field(max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]


class ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: str = Field(max_length=256)
    content: str | list[dict[str, Any]] | None = None
    is_error: bool = False

    _content = field_validator("content", mode="before")(text_or_blocks)


class ThinkingBlock(_Lenient):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Lenient):
    type: Literal["redacted_thinking"]
    data: str = ""


Block = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
BLOCKS: dict[str, type[Block]] = {"text": TextBlock, "tool_use": ToolUseBlock,
                                  "tool_result": ToolResultBlock, "thinking": ThinkingBlock,
                                  "redacted_thinking": RedactedThinkingBlock}


def parse_block(raw: dict[str, Any], where: str, allowed: tuple[str, ...]) -> Block:
    """One content block, validated for its type; a 400 naming `where` otherwise."""
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise InvalidValue(f"{where}.type: a content block needs a type", param=f"{where}.type")
    if kind in UNSUPPORTED_BLOCKS:
        raise InvalidValue(f"{where}: {UNSUPPORTED_BLOCKS[kind]}", param=where)
    if kind not in allowed:
        raise InvalidValue(f"{where}: {kind[:40]!r} blocks are not allowed here (expected "
                           f"{', '.join(allowed)})", param=where)
    try:
        return BLOCKS[kind].model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join([where, *(str(p) for p in first["loc"])])
        raise InvalidValue(f"{param}: {first['msg']}", param=param) from None


def joined_text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """A string, or text blocks joined as paragraphs (system prompts, tool results)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n\n".join(parse_block(raw, f"{where}.{i}", ("text",)).text  # type: ignore[union-attr]
                       for i, raw in enumerate(content))


# -- the request -------------------------------------------------------------------------------


class Message(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]

    _content = field_validator("content", mode="before")(text_or_blocks)


class ToolDefinition(_Lenient):
    type: str | None = None
    name: str
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("type")
    @classmethod
    def _custom_only(cls, value: str | None) -> str | None:
        if value not in (None, "custom"):
            raise ValueError(f"only custom tools (name, description, input_schema) are "
                             f"supported, not {value[:60]!r}")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TOOL_NAME.match(value):
            raise ValueError("tool names are 1 to 128 letters, digits, '_' or '-'")
        return value


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, max_length=128)
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs the tool's name")
        return self


class ThinkingConfig(_Lenient):
    # adaptive and between_tools: the model decides how long to think; we let Qwen3 think.
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _budget(self) -> ThinkingConfig:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking of type 'enabled' needs budget_tokens")
        return self


class OutputFormat(_Lenient):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Lenient):
    effort: str | None = None  # a hint about thinking depth; Qwen3 has no such knob
    format: OutputFormat | None = None


class Conversation(RequestBody):
    """What /v1/messages and /v1/messages/count_tokens share."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    metadata: dict[str, Any] | None = None  # accepted and ignored, as the issue asks
    # Options that would change the answer and that we cannot honour: refused, never ignored.
    container: Any = None
    mcp_servers: Any = None

    _system = field_validator("system", mode="before")(text_or_blocks)

    @model_validator(mode="after")
    def _supported(self) -> Conversation:
        for name in ("container", "mcp_servers"):
            if getattr(self, name):
                raise InvalidValue(f"{name} is not supported", param=name)
        if self.output_format is not None and self.thinking_on:
            # The grammar shapes the answer from its first token: no room to think first.
            raise InvalidValue("thinking may not be enabled with output_config.format",
                               param="thinking")
        if self.output_format is not None and self.forced_tool is not None:
            raise InvalidValue("output_config.format and a forced tool_choice exclude each "
                               "other", param="output_config.format")
        if self.tools:
            names = [t.name for t in self.tools]
            if len(set(names)) != len(names):
                raise InvalidValue("tool names must be unique", param="tools")
        choice = self.tool_choice
        if choice and choice.type in ("any", "tool") and not self.tools:
            raise InvalidValue(f"tool_choice {choice.type!r} needs tools", param="tool_choice")
        if choice and choice.type == "tool" and choice.name not in {t.name for t in self.tools or []}:
            raise InvalidValue(f"tool_choice names {choice.name!r}, which is not in tools",
                               param="tool_choice.name")
        if self.thinking_on and self.forced_tool is not None:
            # Anthropic's own rule: a forced call leaves no room to think first.
            raise InvalidValue("thinking may not be enabled when tool_choice forces tool use",
                               param="thinking")
        return self

    @property
    def thinking_on(self) -> bool:
        # Absent means off, as on Anthropic's API: such apps expect no thinking blocks.
        return self.thinking is not None and self.thinking.type != "disabled"

    @property
    def thinking_budget(self) -> int | None:
        return self.thinking.budget_tokens if self.thinking_on and self.thinking else None

    @property
    def output_format(self) -> ResponseFormat | None:
        """Structured output as the OpenAI-style format core builds a grammar from."""
        fmt = self.output_config.format if self.output_config else None
        if fmt is None:
            return None
        return ResponseFormat.model_validate({"type": "json_schema",
                                              "json_schema": {"schema": fmt.schema_}})

    @property
    def offered_tools(self) -> list[Tool] | None:
        """The tools the model is told about (none for tool_choice none), in OpenAI's form,
        which the chat template and the tool-call grammar take."""
        if not self.tools or (self.tool_choice and self.tool_choice.type == "none"):
            return None
        return [Tool(function=FunctionDef(name=t.name, description=t.description,
                                          parameters=t.input_schema)) for t in self.tools]

    @property
    def forced_tool(self) -> str | None:
        """"" when any tool must be called, the name when one must; None when none is forced."""
        choice = self.tool_choice
        if choice is None or choice.type in ("auto", "none") or not self.tools:
            return None
        return choice.name if choice.type == "tool" else ""

    @property
    def one_call(self) -> bool:
        return bool(self.tool_choice and self.tool_choice.disable_parallel_tool_use)


class MessagesRequest(Conversation):
    max_tokens: int = Field(ge=1, le=2**31 - 1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    stream: bool = False

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        for stop in value or []:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"stop sequences are 1 to {MAX_STOP_CHARS} characters")
        return value


def sampling_of(body: MessagesRequest) -> Sampling:
    """An Anthropic request's sampling in the form core.sampling_params takes."""
    return Sampling(body.temperature, body.top_p, body.top_k)


# -- translation into the template's chat -------------------------------------------------------


def chat_messages(body: Conversation) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it (OpenAI-style messages)."""
    out: list[dict[str, Any]] = []
    system = joined_text(body.system, "system")
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        where = f"messages.{i}.content"
        if isinstance(message.content, str):
            blocks: list[Block] = [TextBlock(type="text", text=message.content)]
        else:
            allowed = (("text", "tool_result") if message.role == "user"
                       else ("text", "tool_use", "thinking", "redacted_thinking"))
            blocks = [parse_block(raw, f"{where}.{j}", allowed)
                      for j, raw in enumerate(message.content)]
        if not blocks:
            raise InvalidValue(f"{where}: a message needs content", param=where)
        if message.role == "user":
            out += _user_turns(blocks, where)
        else:
            out.append(_assistant_turn(blocks))
    if body.messages[-1].role == "assistant":
        raise InvalidValue("a final assistant message (prefill) is not supported: end with a "
                           "user message", param=f"messages.{len(body.messages) - 1}")
    return out


def _user_turns(blocks: list[Block], where: str) -> list[dict[str, Any]]:
    """Tool results become `tool` messages, in order; text around them a user message."""
    turns: list[dict[str, Any]] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            turns.append({"role": "user", "content": "\n\n".join(texts)})
            texts.clear()

    for j, block in enumerate(blocks):
        if isinstance(block, ToolResultBlock):
            flush()
            text = joined_text(block.content, f"{where}.{j}.content")
            turns.append({"role": "tool", "tool_call_id": block.tool_use_id,
                          "content": f"Error: {text}" if block.is_error else text})
        elif isinstance(block, TextBlock):
            texts.append(block.text)
    flush()
    return turns


def _assistant_turn(blocks: list[Block]) -> dict[str, Any]:
    texts = [b.text for b in blocks if isinstance(b, TextBlock)]
    thoughts = [b.thinking for b in blocks if isinstance(b, ThinkingBlock)]
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    turn: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts)}
    if thoughts:
        turn["reasoning_content"] = "\n\n".join(thoughts)
    if calls:
        turn["tool_calls"] = calls
    return turn
