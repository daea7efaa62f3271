"""Ollama-compatible routes: `/api/chat`, `/api/generate`, `/api/tags`, `/api/ps`, `/api/show`...

An app written for Ollama works with only its base URL changed, and its requests go through the
same core as OpenAI's: the engine's continuous batching, prefix reuse, bounded grammars, and
cancellation when the client leaves. Answers stream as NDJSON unless `"stream": false`; errors
are Ollama's `{"error": "message"}` with the status Ollama gives, so its client raises
`ResponseError` with the right `status_code`. Timings are measured, in nanoseconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from appliance.api.core import (
    ClientGone,
    Generation,
    GenerationStream,
    Sampling,
    embed_inputs,
    embedding_inputs,
    max_new_tokens,
    off_loop,
    prepare_chat,
    prepare_text,
    sampling_params,
    truncate_dimensions,
    until_disconnect,
    vectors_response,
)
from appliance.api.deps import (
    ManagerDep,
    MetricsDep,
    RegistryDep,
    SettingsDep,
    UpstreamsDep,
)
from appliance.api.errors import ErrorShapes, error_response
from appliance.api.grammar import response_grammar, schema_grammar
from appliance.api.ollama_models import (
    FileDigests,
    iso_time,
    ollama_name,
    resolve,
    show,
    tag_entries,
)
from appliance.api.ollama_models import details as model_details
from appliance.api.ollama_schemas import (
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    Message,
    ModelRequest,
    Options,
)
from appliance.api.schemas import ResponseFormat
from appliance.config import Settings
from appliance.engine.output import ChatOutputParser, Delta, ToolCall
from appliance.errors import ApplianceError, ContextOverflow, InvalidRequest, InvalidValue
from appliance.metrics import Metrics
from appliance.registry import Registry
from appliance.residency.manager import ModelManager
from appliance.residency.model import CHAT, EMBEDDING, LoadedModel, Prompt
from appliance.residency.status import memory_fields
from appliance.upstream import ollama_answers, to_openai

router = APIRouter()
# The Ollama release whose API this follows (thinking, tools, structured outputs): clients
# turn features on by this number.
OLLAMA_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
CLIENT_GONE = 499
FOREVER_S = 292 * 365 * 86400  # what Ollama shows for a model kept loaded (Go's longest time)
# Paths whose errors take Ollama's shape; /api/status, /api/models... keep the control API's.
ERROR_PREFIXES = ("/api/chat", "/api/generate", "/api/tags", "/api/ps", "/api/show",
                  "/api/embed", "/api/delete", "/api/pull", "/api/push", "/api/copy",
                  "/api/create", "/api/blobs", "/api/version")


def error_shape(status: int, message: str, type_: str, param: str | None,
                code: str | None) -> dict:
    return {"error": message}


def register_error_shape(shapes: ErrorShapes) -> None:
    for prefix in ERROR_PREFIXES:
        shapes.add(prefix, error_shape)


async def _digests(request: Request) -> FileDigests:
    # One per app, made on first use; async so FastAPI runs it on the event loop (a plain def
    # would run on worker threads, where two first requests could each make their own).
    state = request.app.state
    if getattr(state, "ollama_digests", None) is None:
        state.ollama_digests = FileDigests()
    return state.ollama_digests


DigestsDep = Annotated[FileDigests, Depends(_digests)]


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


# -- server and models ------------------------------------------------------------------------


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> PlainTextResponse:
    # Some clients probe for exactly this text before they use the API.
    return PlainTextResponse("Ollama is running")


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_VERSION}


@router.get("/api/tags")
async def tags(registry: RegistryDep, digests: DigestsDep,
               upstreams: UpstreamsDep) -> dict[str, Any]:
    local = await off_loop(tag_entries, registry, digests)
    return {"models": local + ollama_answers.tags(upstreams, {m["name"] for m in local})}


@router.post("/api/show")
async def show_model(body: ModelRequest, registry: RegistryDep, digests: DigestsDep,
                     upstreams: UpstreamsDep) -> dict[str, Any]:
    if (routed := await ollama_answers.upstream_of(upstreams, body.model_name)) is not None:
        return ollama_answers.show(*routed)
    entry = await off_loop(resolve, registry, body.model_name)
    return await off_loop(show, entry, digests)


@router.get("/api/ps")
async def running(manager: ManagerDep, digests: DigestsDep) -> dict[str, Any]:
    """Every resident model (chat models first), each with its own memory: `size_vram` is
    its VRAM (measured around its load where a GPU reports it, else planned) and `size` that
    plus the RAM it was planned to take, as /api/status reports them."""
    now = time.time()
    listed = []
    for model in sorted(manager.resident.values(), key=lambda m: (m.kind != CHAT, m.id)):
        expires = manager.expires_at(model)
        if expires is None:
            continue
        memory = memory_fields(model)
        context = (model.context_per_slot if isinstance(model, LoadedModel)
                   else model.max_input_tokens)
        listed.append({
            "name": ollama_name(model.id), "model": ollama_name(model.id),
            "size": memory["vram"] + memory["planned_ram"],
            "digest": digests.get(model.entry), "details": model_details(model.entry),
            "expires_at": iso_time(now + FOREVER_S if math.isinf(expires) else expires),
            "size_vram": memory["vram"],
            "context_length": context,
        })
    return {"models": listed}


@router.post("/api/embed")
@router.post("/api/embeddings")
async def embed(body: EmbedRequest, request: Request, registry: RegistryDep,
                manager: ManagerDep, upstreams: UpstreamsDep) -> Response:
    """Embeddings through the same core as /v1/embeddings: many inputs per llama.cpp batch."""
    legacy = request.url.path == "/api/embeddings"
    raw = body.prompt if legacy else body.input
    param = "prompt" if legacy else "input"
    if (routed := await ollama_answers.upstream_of(upstreams, body.model_name)) is not None:
        upstream, model_id = routed
        inputs = embedding_inputs(raw, param)
        return await ollama_answers.embed(
            request, upstreams, upstream, to_openai.ollama_embed(model_id, inputs,
                                                                 body.dimensions),
            ollama_name(body.model_name), len(inputs), legacy)
    entry = await off_loop(resolve, registry, body.model_name)
    inputs = embedding_inputs(raw, param)
    started = time.perf_counter()
    async with manager.use(entry.id, kind=EMBEDDING, keep_alive_s=body.keep_alive_s) as model:
        loaded = time.perf_counter()
        try:
            result = await until_disconnect(request, embed_inputs(model, inputs, param,
                                                                  truncate=body.truncate))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        vectors = truncate_dimensions(result.vectors, body.dimensions, model.dimensions)
    if legacy:
        return await vectors_response({"embedding": vectors[0]})
    done = time.perf_counter()
    return await vectors_response({"model": ollama_name(entry.id), "embeddings": vectors,
                         "total_duration": int((done - started) * 1e9),
                         "load_duration": int((loaded - started) * 1e9),
                         "prompt_eval_count": result.prompt_tokens})


def _not_implemented(message: str) -> Response:
    return error_response(501, message, "not_implemented", shape=error_shape)


@router.post("/api/push")
@router.post("/api/create")
@router.post("/api/copy")
async def pull(settings: SettingsDep) -> Response:
    folder = settings.models_dir.expanduser()
    return _not_implemented(
        "this daemon does not push, create or copy models: pull one (`appliance pull "
        f"Qwen/Qwen3-8B-GGUF`, or POST /api/pull), or copy a .gguf file into {folder}; it is "
        "listed at once")


@router.api_route("/api/blobs/{digest}", methods=["HEAD", "POST"], include_in_schema=False)
async def blobs(digest: str, settings: SettingsDep) -> Response:
    return await pull(settings)


# -- generation -------------------------------------------------------------------------------


def _sampling(o: Options) -> Sampling:
    """Ollama's options as core's sampling fields."""
    return Sampling(o.temperature, o.top_p, o.top_k, o.min_p, o.seed, o.presence_penalty or 0.0,
                    o.frequency_penalty or 0.0, o.repeat_penalty or 1.0)


def _grammar(fmt: str | dict[str, Any] | None) -> str | None:
    """Blocking: the grammar for `format` ("json" or a JSON schema), by core's bounded path."""
    if not fmt:
        return None
    if fmt == "json":
        return response_grammar(ResponseFormat(type="json_object"))
    if not isinstance(fmt, dict):
        raise InvalidValue('format is "json" or a JSON schema object', param="format")
    return schema_grammar(fmt, "format")


def _token_limit(options: Options, prompt_len: int, model: LoadedModel,
                 settings: Settings) -> int:
    """How many tokens to generate: num_predict (<= 0: until the context is full), within
    num_ctx, which may narrow a request's context but never widen it."""
    limits = []
    n = options.num_predict
    if n is not None and n > 0:
        limits.append(n)
    elif n is None and settings.max_tokens_default:
        limits.append(settings.max_tokens_default)
    if options.num_ctx is not None:
        if prompt_len >= options.num_ctx:
            raise ContextOverflow(f"the prompt has {prompt_len} tokens, more than options.num_ctx "
                                  f"({options.num_ctx}) allows", param="options.num_ctx")
        limits.append(options.num_ctx - prompt_len)
    return max_new_tokens(min(limits) if limits else None, prompt_len, model, None)


def _check_num_ctx(options: Options, model: LoadedModel) -> None:
    if options.num_ctx is not None and options.num_ctx > model.context_per_slot:
        raise InvalidValue(
            f"options.num_ctx is {options.num_ctx}, but each request to {model.id} gets "
            f"{model.context_per_slot} tokens of context; ask for at most that, or raise "
            "context_length in the daemon's settings (APPLIANCE_CONTEXT_LENGTH, or "
            "context_length under [models.ID])", param="options.num_ctx")


def _no_images(images: list[str] | None, name: str, param: str) -> None:
    if images:
        raise InvalidValue(f"{param}: model {name[:256]!r} cannot see images (it has no "
                           "vision); send text only", param=param)


@dataclass
class _Run:
    """One generating request: the name the client used, its clock, and the engine request."""

    name: str
    started: float
    load_s: float
    generation: Generation
    parser: ChatOutputParser | None  # None for raw prompts: the text is passed through

    def stats(self) -> dict[str, Any]:
        g = self.generation
        assert g.outcome is not None
        end = g.finished_at or time.perf_counter()
        first = g.first_text_at or end
        return {"done_reason": g.outcome.finish_reason,
                "total_duration": _ns(time.perf_counter() - self.started),
                "load_duration": _ns(self.load_s),
                "prompt_eval_count": g.outcome.prompt_tokens,
                # From submission to the first text: a wait for a free slot counts here.
                "prompt_eval_duration": _ns(first - g.started),
                "eval_count": g.outcome.completion_tokens,
                # At least 1 ns: clients divide eval_count by it for tokens per second.
                "eval_duration": max(1, _ns(end - first))}

    def feed(self, text: str) -> Delta:
        return self.parser.feed(text) if self.parser else Delta(content=text)

    def finish(self) -> tuple[Delta, list[ToolCall]]:
        return self.parser.finish() if self.parser else (Delta(), [])


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


# Renders and tokenizes the prompt for the held model with thinking on or off; gives the parser.
PromptBuilder = Callable[[LoadedModel, bool],
                         Awaitable[tuple[Prompt, "ChatOutputParser | None"]]]
# Shapes one answer object from a delta, the tool calls, and the final stats (None until done).
Chunk = Callable[[Delta, list[ToolCall], "dict[str, Any] | None"], dict[str, Any]]


async def _start(body: ChatRequest | GenerateRequest, manager: ModelManager, registry: Registry,
                 settings: Settings, metrics: Metrics, build: PromptBuilder | None
                 ) -> tuple[_Run, contextlib.AsyncExitStack] | Response:
    """Resolve the model, hold it, prepare the prompt (`build`) and submit: a run, or the
    answer to an empty request (Ollama's load and unload)."""
    started = time.perf_counter()
    entry = await off_loop(resolve, registry, body.model)
    if build is None:
        return await _load_or_unload(manager, entry.id, body)
    grammar = await off_loop(_grammar, body.format)
    stack = contextlib.AsyncExitStack()
    model = await stack.enter_async_context(manager.use(entry.id, keep_alive_s=body.keep_alive_s))
    load_s = time.perf_counter() - started
    try:
        options = body.opts
        _check_num_ctx(options, model)
        thinking = model.enable_thinking if body.thinking is None else body.thinking
        if grammar is not None:
            thinking = False  # the grammar must shape the answer from its first token
        prompt, parser = await build(model, thinking)
        if not prompt.tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        generation = Generation(model, prompt.tokens,
                                sampling_params(_sampling(options), model, grammar),
                                _token_limit(options, len(prompt.tokens), model, settings),
                                options.stop or [], metrics)
        stack.callback(generation.cancel)
    except BaseException:
        await stack.aclose()
        raise
    return _Run(body.model, started, load_s, generation, parser), stack


async def _load_or_unload(manager: ModelManager, model_id: str,
                          body: ChatRequest | GenerateRequest) -> Response:
    """An empty request loads the model, or with keep_alive 0 unloads it (`ollama stop`)."""
    if body.keep_alive_s == 0:
        if model_id in manager.resident:
            await manager.unload("the model was unloaded by a client (keep_alive 0)",
                                 model_id=model_id)
        reason = "unload"
    else:
        async with manager.use(model_id, keep_alive_s=body.keep_alive_s):
            pass
        reason = "load"
    return _loaded(body, reason)


def _loaded(body: ChatRequest | GenerateRequest, reason: str) -> Response:
    """The answer to a load or unload request (for an upstream model, there is nothing to do:
    its server keeps its own models)."""
    answer: dict[str, Any] = {"model": body.model, "created_at": iso_time(time.time())}
    if isinstance(body, ChatRequest):
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    answer.update(done=True, done_reason=reason)
    return Response(_line(answer), media_type=NDJSON if body.stream else "application/json")


async def _stream(run: _Run, chunk: Chunk) -> AsyncIterator[bytes]:
    """NDJSON lines: `chunk(delta, calls, final)` shapes each; errors end the stream as Ollama
    ends it, with an `{"error": ...}` line."""
    try:
        # pieces(), not texts(): one async generator less between the engine and the socket
        # per token (both cancel the request when the stream ends early).
        async for piece in run.generation.pieces():
            if piece.text and (delta := run.feed(piece.text)):
                yield _line(chunk(delta, [], None))
    except ApplianceError as e:
        yield _line({"error": e.message})
        return
    tail, calls = run.finish()
    if tail or calls:
        yield _line(chunk(tail, calls, None))
    yield _line(chunk(Delta(), [], run.stats()))


async def _whole(run: _Run) -> tuple[Delta, list[ToolCall]]:
    reasoning, content = [], []
    async for text in run.generation.texts():
        delta = run.feed(text)
        reasoning.append(delta.reasoning)
        content.append(delta.content)
    tail, calls = run.finish()
    return Delta("".join(reasoning) + tail.reasoning, "".join(content) + tail.content), calls


async def _answer(request: Request, run: _Run, stack: contextlib.AsyncExitStack, stream: bool,
                  chunk: Chunk) -> Response:
    if stream:
        return GenerationStream(_stream(run, chunk), stack, media_type=NDJSON)
    async with stack:
        try:
            delta, calls = await until_disconnect(request, _whole(run))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    return JSONResponse(chunk(delta, calls, run.stats()))


def _tool_calls(calls: list[ToolCall]) -> tuple[list[dict[str, Any]], str]:
    """Ollama's tool calls (arguments as an object), and the text of any call whose arguments
    are not an object, which goes back into the content rather than being lost."""
    out, leftover = [], ""
    for index, call in enumerate(calls):
        try:
            arguments = json.loads(call.arguments)
        except json.JSONDecodeError:
            arguments = None
        if isinstance(arguments, dict):
            out.append({"function": {"index": index, "name": call.name,
                                     "arguments": arguments}})
        else:
            leftover += json.dumps({"name": call.name, "arguments": call.arguments})
    return out, leftover


def _chat_messages(body: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(body.messages):
        _no_images(message.images, body.model, f"messages.{i}.images")
        out.append(_chat_message(message))
    return out


def _chat_message(message: Message) -> dict[str, Any]:
    item: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.thinking:
        item["reasoning_content"] = message.thinking
    if message.tool_calls:
        item["tool_calls"] = [{"type": "function", "function": {
            "name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls]
    if message.tool_name:
        item["name"] = message.tool_name
    return item


@router.post("/api/chat", response_model=None)
async def chat(body: ChatRequest, request: Request, manager: ManagerDep, registry: RegistryDep,
               settings: SettingsDep, metrics: MetricsDep, upstreams: UpstreamsDep) -> Response:
    messages = _chat_messages(body)  # refuses images before any model is loaded
    tools = [t.model_dump() for t in body.tools] if body.tools else None

    def chunk(delta: Delta, calls: list[ToolCall], stats: dict[str, Any] | None
              ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": delta.content}
        if delta.reasoning:
            message["thinking"] = delta.reasoning
        if calls:
            message["tool_calls"], leftover = _tool_calls(calls)
            message["content"] += leftover
        return {"model": body.model, "created_at": iso_time(time.time()), "message": message,
                "done": stats is not None, **(stats or {})}

    if (routed := await ollama_answers.upstream_of(upstreams, body.model)) is not None:
        if not messages:
            return _loaded(body, "unload" if body.keep_alive_s == 0 else "load")
        upstream, model_id = routed
        ask = {**to_openai.ollama_chat(body, messages), "model": model_id}
        return await ollama_answers.answer(request, upstreams, upstream, ask, body.stream,
                                           chunk)

    async def build(model: LoadedModel, thinking: bool) -> tuple[Prompt, ChatOutputParser]:
        prompt = await prepare_chat(model, messages, tools, thinking)
        return prompt, ChatOutputParser(prompt=prompt.text, parse_tools=tools is not None)

    started = await _start(body, manager, registry, settings, metrics,
                           build if messages else None)
    if isinstance(started, Response):
        return started
    run, stack = started
    return await _answer(request, run, stack, body.stream, chunk)


def _refuse_generate_fields(body: GenerateRequest) -> None:
    """Fields that would change the answer and that we cannot honour: refused, not ignored."""
    _no_images(body.images, body.model, "images")
    if body.template:
        raise InvalidValue("template (a Go template) is not supported: the model's own chat "
                           "template is used; send raw=true with a prompt you formatted, or use "
                           "/api/chat", param="template")
    if body.suffix:
        raise InvalidValue("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.context:
        raise InvalidValue("context (deprecated by Ollama) is not supported: send the "
                           "conversation to /api/chat", param="context")


@router.post("/api/generate", response_model=None)
async def generate(body: GenerateRequest, request: Request, manager: ManagerDep,
                   registry: RegistryDep, settings: SettingsDep,
                   metrics: MetricsDep, upstreams: UpstreamsDep) -> Response:
    _refuse_generate_fields(body)

    def chunk(delta: Delta, calls: list[ToolCall], stats: dict[str, Any] | None
              ) -> dict[str, Any]:
        data: dict[str, Any] = {"model": body.model, "created_at": iso_time(time.time()),
                                "response": delta.content}
        if delta.reasoning:
            data["thinking"] = delta.reasoning
        return {**data, "done": stats is not None, **(stats or {})}

    if (routed := await ollama_answers.upstream_of(upstreams, body.model)) is not None:
        if not body.prompt:
            return _loaded(body, "unload" if body.keep_alive_s == 0 else "load")
        upstream, model_id = routed
        raw = body.raw  # the client formatted the prompt: the upstream's completions take it
        ask = to_openai.ollama_raw(body) if raw else to_openai.ollama_generate(body)
        return await ollama_answers.answer(request, upstreams, upstream,
                                           {**ask, "model": model_id}, body.stream, chunk,
                                           "completions" if raw else "chat/completions")

    async def build(model: LoadedModel, thinking: bool
                    ) -> tuple[Prompt, ChatOutputParser | None]:
        if body.raw:  # the client formatted the prompt, special tokens included
            return await prepare_text(model, body.prompt), None
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        prompt = await prepare_chat(model, messages, None, thinking)
        return prompt, ChatOutputParser(prompt=prompt.text, parse_tools=False)

    started = await _start(body, manager, registry, settings, metrics,
                           build if body.prompt else None)
    if isinstance(started, Response):
        return started
    run, stack = started
    return await _answer(request, run, stack, body.stream, chunk)
