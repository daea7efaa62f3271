"""Each dialect's validated request as the OpenAI chat-completions body an upstream takes.

The dialect modules already turn their conversations into OpenAI-style chat messages for the
chat template; here those messages are made strictly OpenAI (tool-call arguments as JSON text,
ids that tie each tool result to its call) and the dialect's options are mapped:

- sampling (temperature, top_p, top_k, min_p, seed, penalties), the token limit, stop strings;
- tools and tool_choice; JSON format / schema → `response_format`;
- thinking on or off → `chat_template_kwargs.enable_thinking`, which Qwen3 servers (vLLM,
  llama-server, this daemon) read.

Dropped, because an OpenAI server has no such field: Ollama's keep_alive and num_ctx (the
upstream manages its own memory and context) and the other Ollama options; thinking budgets
(Anthropic's budget_tokens, our thinking_budget); Anthropic's metadata. Stop sequences of an
Anthropic request are matched here, not sent, so the answer can say which one matched.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.api.ollama_schemas import ChatRequest, GenerateRequest, Options
from appliance.api.routes.anthropic_request import MessagesRequest
from appliance.api.routes.responses_request import NamedFunction, ResponsesRequest
from appliance.api.schemas import Tool


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages with every tool call's arguments as JSON text and an id on each call; a
    tool result without an id takes the id of the earliest unanswered call (of its name, when
    it names one), as Ollama's conversations carry no ids."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    for message in messages:
        item = dict(message)
        if item.get("tool_calls"):
            calls = []
            for call in item["tool_calls"]:
                function = call.get("function") or {}
                arguments = function.get("arguments")
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments if arguments is not None else {},
                                           ensure_ascii=False)
                call_id = call.get("id") or f"call_{len(out)}_{len(calls)}"
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": function.get("name", ""),
                                           "arguments": arguments}})
                open_calls.append((call_id, function.get("name", "")))
            item["tool_calls"] = calls
        if item.get("role") == "tool":
            item = _answering(item, open_calls)
        out.append(item)
    return out


def _answering(item: dict[str, Any], open_calls: list[tuple[str, str]]) -> dict[str, Any]:
    call_id = item.get("tool_call_id")
    if call_id:
        open_calls[:] = [c for c in open_calls if c[0] != call_id]
        return item
    name = item.pop("name", None)
    match = next((c for c in open_calls if name is None or c[1] == name),
                 open_calls[0] if open_calls else None)
    if match is None:
        return {**item, "tool_call_id": "call_unknown"}
    open_calls.remove(match)
    return {**item, "tool_call_id": match[0]}


def _tools(tools: list[Tool] | list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    return [t.model_dump(exclude_none=True) if isinstance(t, Tool) else
            {"type": "function", "function": t["function"]} for t in tools]


def _schema_format(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def _body(model: str, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """The request, with the fields left unset left out (the upstream's defaults hold)."""
    body: dict[str, Any] = {"model": model, "messages": openai_messages(messages)}
    body.update({k: v for k, v in fields.items() if v is not None})
    return body


def _thinking(on: bool | None) -> dict[str, Any] | None:
    return None if on is None else {"enable_thinking": on}


# -- Ollama ---------------------------------------------------------------------------------------


def _ollama_options(options: Options) -> dict[str, Any]:
    n = options.num_predict
    return {"temperature": options.temperature, "top_p": options.top_p, "top_k": options.top_k,
            "min_p": options.min_p, "seed": options.seed,
            "presence_penalty": options.presence_penalty,
            "frequency_penalty": options.frequency_penalty,
            "repeat_penalty": options.repeat_penalty,
            "max_tokens": n if n is not None and n > 0 else None,
            "stop": options.stop or None}


def _ollama_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if not fmt:
        return None
    if fmt == "json":
        return {"type": "json_object"}
    return _schema_format(fmt, "format") if isinstance(fmt, dict) else None


def ollama_chat(body: ChatRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """/api/chat; `messages` as the route made them for the template. With a format and no
    `think`, thinking is off, as for a local model (the format shapes the whole answer)."""
    thinking = body.thinking
    fmt = _ollama_format(body.format)
    return _body(body.model, messages, tools=_tools([t.model_dump() for t in body.tools or []]),
                 response_format=fmt,
                 chat_template_kwargs=_thinking(False if fmt and thinking is None else thinking),
                 **_ollama_options(body.opts))


def ollama_generate(body: GenerateRequest) -> dict[str, Any]:
    """/api/generate as a chat: the system prompt and the prompt as its two turns (raw prompts
    go to /v1/completions, see `ollama_raw`)."""
    messages = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": body.prompt})
    fmt = _ollama_format(body.format)
    thinking = body.thinking
    return _body(body.model, messages, response_format=fmt,
                 chat_template_kwargs=_thinking(False if fmt and thinking is None else thinking),
                 **_ollama_options(body.opts))


def ollama_raw(body: GenerateRequest) -> dict[str, Any]:
    """/api/generate with raw=true: the client's own formatted prompt, for /v1/completions."""
    fields = {k: v for k, v in _ollama_options(body.opts).items() if v is not None}
    return {"model": body.model, "prompt": body.prompt, **fields}


def ollama_embed(model: str, inputs: list[str] | list[list[int]], dimensions: int | None
                 ) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "input": inputs}
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


# -- Anthropic ------------------------------------------------------------------------------------


def anthropic_messages(body: MessagesRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """/v1/messages; `messages` as chat_messages made them. Stop sequences stay here."""
    tools = body.offered_tools
    forced = body.forced_tool
    choice: Any = None
    if tools:
        choice = ("auto" if forced is None else "required" if not forced else
                  {"type": "function", "function": {"name": forced}})
    fmt = body.output_config.format if body.output_config else None
    return _body(body.model, messages, tools=_tools(tools), tool_choice=choice,
                 parallel_tool_calls=False if body.one_call else None,
                 response_format=_schema_format(fmt.schema_, "output") if fmt else None,
                 chat_template_kwargs=_thinking(body.thinking_on),
                 max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                 top_k=body.top_k)


# -- Responses ------------------------------------------------------------------------------------


def responses(body: ResponsesRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """/v1/responses; `messages` as chat_messages made them."""
    tools = body.offered_tools
    choice: Any = None
    if tools:
        choice = body.tool_choice
        if isinstance(choice, NamedFunction):
            choice = {"type": "function", "function": {"name": choice.name}}
    fmt = body.text_format
    response_format = None
    if fmt.type == "json_object":
        response_format = {"type": "json_object"}
    elif fmt.type == "json_schema":
        response_format = _schema_format(fmt.schema_ or {"type": "object"}, fmt.name or "output")
    effort = body.reasoning.effort if body.reasoning else None
    return _body(body.model, messages, tools=_tools(tools), tool_choice=choice,
                 parallel_tool_calls=None if body.parallel_tool_calls else False,
                 response_format=response_format,
                 chat_template_kwargs=_thinking(None if effort is None
                                                else effort not in ("none", "minimal")),
                 max_tokens=body.max_output_tokens, temperature=body.temperature,
                 top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
                 logit_bias=body.logit_bias)
