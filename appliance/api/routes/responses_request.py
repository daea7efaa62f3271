"""OpenAI Responses request bodies (the stateless subset), and their translation into the chat
the template renders.

Every field a client controls is bounded here. What we cannot honour is refused with a 400 that
names it, never ignored: state kept between requests (`previous_response_id`, `conversation`,
`background`), built-in tools, images and files, item references. Fields that change nothing
about the answer (`store`, `user`, `metadata`, `include`, `service_tier`...) are accepted.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from appliance.api.core import Sampling
from appliance.api.schemas import MAX_TOOLS, TOKEN_ID, FunctionDef, RequestBody, Tool
from appliance.errors import InvalidValue

MAX_ITEMS = 10_000  # input items, as many as a long agent conversation has
MAX_METADATA = 16  # pairs; OpenAI's bounds on metadata keys and values follow
MAX_METADATA_KEY, MAX_METADATA_VALUE = 64, 512
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_VISION = "the model reads text only; send the text as input_text"
UNSUPPORTED_PARTS = {"input_image": NO_VISION, "input_file": NO_VISION, "input_audio": NO_VISION}
STATELESS = ("this daemon keeps no responses (it is stateless): send the whole conversation "
             "in input, with earlier output items passed back as items")


class _Lenient(BaseModel):
    # Fields newer clients add that do not change the answer: accepted and ignored.
    model_config = ConfigDict(extra="ignore")


def _first_error(e: ValidationError, where: str) -> InvalidValue:
    first = e.errors()[0]
    param = ".".join([where, *(str(p) for p in first["loc"])])
    return InvalidValue(f"{param}: {first['msg']}", param=param)


def _kind(raw: Any, where: str) -> str:
    if not isinstance(raw, dict):
        raise InvalidValue(f"{where} must be an object", param=where)
    kind = raw.get("type")
    if kind is None and "role" in raw:
        return "message"  # the easy form: {"role": ..., "content": ...}
    if not isinstance(kind, str):
        raise InvalidValue(f"{where}.type: an item needs a type", param=f"{where}.type")
    return kind


# -- input items --------------------------------------------------------------------------------


class TextPart(_Lenient):
    type: Literal["input_text", "output_text", "text"]
    text: str


class RefusalPart(_Lenient):
    type: Literal["refusal"]
    refusal: str


def part_text(raw: Any, where: str) -> str:
    """The text of one content part; images, files and audio are a 400 naming the part."""
    kind = _kind(raw, where)
    if kind in UNSUPPORTED_PARTS:
        raise InvalidValue(f"{where}: {kind} parts are not supported: {UNSUPPORTED_PARTS[kind]}",
                           param=where)
    try:
        if kind == "refusal":
            return RefusalPart.model_validate(raw).refusal
        if kind in ("input_text", "output_text", "text"):
            return TextPart.model_validate(raw).text
    except ValidationError as e:
        raise _first_error(e, where) from None
    raise InvalidValue(f"{where}: {kind[:40]!r} content parts are not supported (expected "
                       "input_text or output_text)", param=where)


def content_text(content: Any, where: str) -> str:
    """A string, or text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidValue(f"{where} must be a string or a list of content parts", param=where)
    return "".join(part_text(raw, f"{where}.{i}") for i, raw in enumerate(content))


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Any


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: Any


class ReasoningItem(_Lenient):
    type: Literal["reasoning"]
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None

    def text(self, where: str) -> str:
        """The reasoning text (its content, else its summary); encrypted content is ignored."""
        parts, key = (self.content, "content") if self.content else (self.summary, "summary")
        texts = []
        for i, raw in enumerate(parts):
            text = raw.get("text")
            if not isinstance(text, str):
                raise InvalidValue(f"{where}.{key}.{i}.text must be a string",
                                   param=f"{where}.{key}.{i}.text")
            texts.append(text)
        return "\n\n".join(texts)


ITEMS: dict[str, type[BaseModel]] = {"message": MessageItem, "function_call": FunctionCallItem,
                                     "function_call_output": FunctionCallOutputItem,
                                     "reasoning": ReasoningItem}


def parse_item(raw: Any, where: str) -> BaseModel:
    kind = _kind(raw, where)
    if kind == "item_reference":
        raise InvalidValue(f"{where}: item references are not supported: {STATELESS}",
                           param=where)
    if kind not in ITEMS:
        raise InvalidValue(f"{where}: {kind[:40]!r} items are not supported (expected message, "
                           "function_call, function_call_output or reasoning)", param=where)
    try:
        return ITEMS[kind].model_validate(raw)
    except ValidationError as e:
        raise _first_error(e, where) from None


# -- tools and formats ---------------------------------------------------------------------------


class FunctionTool(_Lenient):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TOOL_NAME.match(value):
            raise ValueError("function names are 1 to 64 letters, digits, '_' or '-'")
        return value


def parse_tool(raw: Any, where: str) -> FunctionTool:
    kind = _kind(raw, where)
    if kind != "function":
        raise InvalidValue(f"{where}: {kind[:40]!r} tools are not supported: only function "
                           "tools (the daemon has no built-in search, files, computer or MCP)",
                           param=f"{where}.type")
    try:
        return FunctionTool.model_validate(raw)
    except ValidationError as e:
        raise _first_error(e, where) from None


class NamedFunction(_Lenient):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a json_schema format needs a schema object")
        return self


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint; Qwen3 has no such knob


class ReasoningConfig(_Lenient):
    # Qwen3 thinks or does not: "none" and "minimal" turn it off, the others on.
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # we return the whole thought


# -- the request -------------------------------------------------------------------------------


class ResponsesRequest(RequestBody):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[Any] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = Field(None, ge=1, le=MAX_TOOLS)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool | None = None  # accepted and ignored: nothing is stored, nothing can be fetched
    metadata: dict[str, str] | None = Field(None, max_length=MAX_METADATA)
    user: str | None = Field(None, max_length=256)
    include: list[str] | None = Field(None, max_length=32)
    # Qwen's own knobs, as on /v1/chat/completions (extensions to OpenAI's API).
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    thinking_budget: int | None = Field(None, ge=1, le=2**31 - 1)
    # State and options that would change the answer: refused, never ignored.
    previous_response_id: Any = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    _functions: list[FunctionTool] = PrivateAttr(default_factory=list)

    @field_validator("input", mode="before")
    @classmethod
    def _input_kind(cls, value: Any) -> Any:
        # Checked before the union, whose own error would name a branch ("input.str").
        if not isinstance(value, (str, list)):
            raise ValueError("input must be a string or a list of items")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice_kind(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError("tool_choice is 'none', 'auto', 'required' or "
                             "{\"type\": \"function\", \"name\": ...}")
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError("only function tool choices are supported: "
                             "{\"type\": \"function\", \"name\": ...}")
        return value

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, list) and not value:
            raise ValueError("input needs at least one item")
        if isinstance(value, list) and len(value) > MAX_ITEMS:
            raise ValueError(f"at most {MAX_ITEMS} input items")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if len(key) > MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
                raise ValueError(f"metadata keys are at most {MAX_METADATA_KEY} characters, "
                                 f"values at most {MAX_METADATA_VALUE}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():  # the same rule as chat's logit_bias
            if not TOKEN_ID.match(key):
                raise ValueError(f"logit_bias keys are token ids, got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values must be between -100 and 100")
        return value

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        for name in ("previous_response_id", "conversation", "prompt"):
            if getattr(self, name) is not None:
                raise InvalidValue(f"{name} is not supported: {STATELESS}", param=name)
        if self.background:
            raise InvalidValue("background responses are not supported: the daemon keeps no "
                               "responses to poll; stream instead", param="background")
        if self.truncation == "auto":
            raise InvalidValue("truncation 'auto' is not supported: a conversation longer than "
                               "the context is refused, never cut silently", param="truncation")
        if self.top_logprobs:
            raise InvalidValue("top_logprobs is not supported on /v1/responses; use "
                               "/v1/chat/completions", param="top_logprobs")
        if self.include and "message.output_text.logprobs" in self.include:
            raise InvalidValue("logprobs are not supported on /v1/responses; use "
                               "/v1/chat/completions", param="include")
        tools = self._functions = [parse_tool(raw, f"tools.{i}")
                                   for i, raw in enumerate(self.tools or [])]
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise InvalidValue("tool names must be unique", param="tools")
        choice = self.tool_choice
        if choice == "required" and not tools:
            raise InvalidValue("tool_choice 'required' needs tools", param="tool_choice")
        if isinstance(choice, NamedFunction) and choice.name not in names:
            raise InvalidValue(f"tool_choice names {choice.name!r}, which is not in tools",
                               param="tool_choice.name")
        if self.forced_tool is not None and self.text_format.type != "text":
            raise InvalidValue("text.format and a forced tool_choice exclude each other",
                               param="text.format")
        return self

    @property
    def function_tools(self) -> list[FunctionTool]:
        return self._functions

    @property
    def offered_tools(self) -> list[Tool] | None:
        """The tools the model is told about (none for tool_choice none), in the chat form
        the template and the tool-call grammar take."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [Tool(function=FunctionDef(name=t.name, description=t.description,
                                          parameters=t.parameters or {"type": "object"}))
                for t in self.function_tools]

    @property
    def forced_tool(self) -> str | None:
        """"" when some tool must be called, the name when one must; None when none is."""
        if not self.tools:
            return None
        if self.tool_choice == "required":
            return ""
        return self.tool_choice.name if isinstance(self.tool_choice, NamedFunction) else None

    @property
    def text_format(self) -> TextFormat:
        fmt = self.text.format if self.text else None
        return fmt or TextFormat(type="text")

    def thinking(self, model_default: bool) -> bool:
        """Qwen3 thinking: reasoning.effort none/minimal turns it off, any other effort on;
        without an effort the model's own default holds."""
        effort = self.reasoning.effort if self.reasoning else None
        return model_default if effort is None else effort not in ("none", "minimal")

    @property
    def call_limit(self) -> int | None:
        """How many function calls to return at most (None: all the model makes)."""
        limits = [n for n in (self.max_tool_calls, None if self.parallel_tool_calls else 1) if n]
        return min(limits) if limits else None

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.seed,
                        logit_bias=self.logit_bias)

    def echo(self) -> dict[str, Any]:
        """The request's settings as the response object repeats them."""
        fmt = self.text_format.model_dump(by_alias=True, exclude_none=True)
        return {"instructions": self.instructions, "metadata": self.metadata or {},
                "temperature": self.temperature, "top_p": self.top_p,
                "max_output_tokens": self.max_output_tokens,
                "parallel_tool_calls": self.parallel_tool_calls,
                "tool_choice": (self.tool_choice.model_dump() if isinstance(
                    self.tool_choice, NamedFunction) else self.tool_choice or "auto"),
                "tools": [t.model_dump(exclude_none=True) for t in self.function_tools],
                "text": {"format": fmt}, "user": self.user, "store": False,
                "reasoning": {"effort": self.reasoning.effort if self.reasoning else None,
                              "summary": None},
                "previous_response_id": None, "truncation": "disabled", "background": False}


# -- translation into the template's chat --------------------------------------------------------


def chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """Instructions and input as the chat template takes them (OpenAI chat messages): an
    assistant turn gathers the reasoning, text and function calls that follow each other."""
    out: list[dict[str, Any]] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        out.append({"role": "user", "content": body.input})
        return out
    for i, raw in enumerate(body.input):
        where = f"input.{i}"
        item = parse_item(raw, where)
        last = out[-1] if out and out[-1]["role"] == "assistant" else None
        if isinstance(item, MessageItem):
            text = content_text(item.content, f"{where}.content")
            if item.role != "assistant":
                out.append({"role": "system" if item.role == "developer" else item.role,
                            "content": text})
            elif last is not None and not last["content"] and "tool_calls" not in last:
                last["content"] = text  # the answer after its reasoning
            else:
                out.append({"role": "assistant", "content": text})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if last is None:
                last = {"role": "assistant", "content": ""}
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": content_text(item.output, f"{where}.output")})
        elif isinstance(item, ReasoningItem):
            thought = item.text(where)
            if last is not None and not last["content"] and "tool_calls" not in last:
                last["reasoning_content"] = (last.get("reasoning_content", "") + thought)
            else:
                out.append({"role": "assistant", "content": "", "reasoning_content": thought})
    return out
