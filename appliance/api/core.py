"""The dialect-neutral core between HTTP handlers and the engine: prepare a request (template,
tokens, sampling, grammar: blocking work, run off the event loop), submit it, await its events,
and cancel it the moment its client goes away, streaming or not.

Every dialect module goes through here; none touches the runtime or the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from appliance.engine.sampling import SamplingParams
from appliance.engine.scheduler import (
    DoneEvent,
    ErrorEvent,
    Event,
    GenerationRequest,
    TextEvent,
)
from appliance.engine.text import StopMatcher
from appliance.errors import InvalidRequest
from appliance.metrics import Metrics
from appliance.residency.model import LoadedModel, Prompt

T = TypeVar("T")


class SamplingInput(Protocol):
    """What a dialect hands over for sampling (OpenAI's SamplingFields is one); None = default."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    repeat_penalty: float
    logit_bias: dict[str, float] | None


@dataclass(frozen=True)
class Sampling:
    """A dialect's sampling fields as a SamplingInput (None: the model's own default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None


def sampling_params(body: SamplingInput, model: LoadedModel, grammar: str | None,
                    grammar_after_think: bool = False) -> SamplingParams:
    """The request's sampling, with the model's own recommended defaults (GGUF) for the rest."""
    meta = model.metadata
    defaults = SamplingParams()

    def pick(value: float | int | None, key: str, fallback: float | int) -> float | int:
        if value is not None:
            return value
        stored = meta.get(f"general.sampling.{key}")
        return stored if isinstance(stored, (int, float)) else fallback

    n_vocab = model.n_vocab
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < n_vocab:
            raise InvalidRequest(f"logit_bias token {token} is outside the vocabulary "
                                 f"(0..{n_vocab - 1})", param="logit_bias")
        bias[token] = float(value)
    return SamplingParams(
        temperature=float(pick(body.temperature, "temp", defaults.temperature)),
        top_p=float(pick(body.top_p, "top_p", defaults.top_p)),
        top_k=int(pick(body.top_k, "top_k", defaults.top_k)),
        min_p=float(pick(body.min_p, "min_p", defaults.min_p)),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=body.repeat_penalty,
        logit_bias=bias,
        grammar=grammar,
        grammar_after_think=grammar_after_think,  # thinking first, then the shaped answer
    )


@dataclass
class Outcome:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    thinking_tokens: int = 0  # of completion_tokens, those inside <think>


class Generation:
    """One request in the engine, seen from the event loop."""

    def __init__(self, model: LoadedModel, prompt_tokens: list[int], sampling: SamplingParams,
                 max_tokens: int, stop: list[str], metrics: Metrics,
                 thinking_budget: int | None = None, *, n: int = 1,
                 logprobs: int | None = None, open_thinking: bool = False) -> None:
        """`thinking_budget`: thinking tokens before the engine closes `<think>` itself; `n`
        choices; `logprobs`: report each token's and the k likeliest; `open_thinking`: the
        prompt gets "<think>\n" (the model thinks before a grammar-shaped answer)."""
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._metrics = metrics
        self._model = model
        self.started = time.perf_counter()
        self.first_text_at: float | None = None  # perf_counter of the first text, and the end:
        self.finished_at: float | None = None  # Ollama reports the durations they delimit
        self.outcome: Outcome | None = None
        self.finish_reasons: dict[int, str] = {}  # per choice, once each has finished
        self.request = GenerationRequest(prompt_tokens, sampling, max_tokens, stop, self._emit,
                                         thinking_budget=thinking_budget, n=n,
                                         logprobs=logprobs, open_thinking=open_thinking)
        model.submit(self.request)

    def cancel(self) -> None:
        """Withdraw the request unless it has finished (idempotent)."""
        if self.outcome is None:
            self._model.cancel(self.request)

    def _emit(self, event: Event) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def texts(self) -> AsyncIterator[str]:
        """Generated text pieces as they come; sets `outcome` at the end. Cancels on exit."""
        try:
            async for piece in self.pieces():
                if piece.text:
                    yield piece.text
        finally:
            self.cancel()  # closed early: `pieces` may not be finalized until collected

    async def pieces(self) -> AsyncIterator[TextEvent]:
        """Every choice's text (with logprobs when asked) as it comes; sets `outcome` once all
        choices have finished (the first choice's finish, completion tokens summed)."""
        last = None
        completion = thinking = 0
        try:
            while True:
                event = await self._queue.get()
                if isinstance(event, TextEvent):
                    now = time.perf_counter()
                    if last is None:
                        self.first_text_at = now
                        self._metrics.ttft.observe(now - self.started)
                    else:
                        self._metrics.inter_token.observe(now - last)
                    last = now
                    yield event
                elif isinstance(event, DoneEvent):
                    self.finished_at = time.perf_counter()
                    self.finish_reasons[event.index] = event.finish_reason
                    completion += event.completion_tokens
                    thinking += event.thinking_tokens
                    if len(self.finish_reasons) < self.request.n:
                        continue
                    self.outcome = Outcome(self.finish_reasons[0], event.prompt_tokens,
                                           completion, event.cached_tokens, thinking)
                    self._metrics.prompt_tokens.inc(event.prompt_tokens)
                    self._metrics.completion_tokens.inc(completion)
                    return
                elif isinstance(event, ErrorEvent):
                    raise event.error
        finally:
            self.cancel()  # client gone or error: free the slot, or leave the queue, now

    def usage(self) -> dict:
        o = self.outcome
        if o is None:
            return {}
        return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                "total_tokens": o.prompt_tokens + o.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": o.cached_tokens}}


def max_new_tokens(requested: int | None, prompt_len: int, model: LoadedModel,
                   cap: int | None) -> int:
    room = model.context_per_slot - prompt_len - 1
    limit = requested or cap or room
    return max(1, min(limit, room))


async def prepare_chat(model: LoadedModel, messages: list[dict[str, Any]],
                       tools: list[dict] | None, enable_thinking: bool) -> Prompt:
    """Render and tokenize in a worker thread: a 1 MB prompt must not stall /health."""
    return await asyncio.to_thread(model.prepare_chat, messages, tools, enable_thinking)


async def prepare_text(model: LoadedModel, text: str) -> Prompt:
    return await asyncio.to_thread(model.prepare_text, text)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Blocking work (grammar building, header scans) on a worker thread."""
    return await asyncio.to_thread(fn, *args)


async def vectors_response(payload: dict[str, Any]) -> Response:
    """A JSON answer holding float32 numpy vectors, encoded off the event loop by orjson: each
    number in its shortest form that reads back as the same float32. Measured for 256 vectors
    of 1024: 0.33 s of json.dumps on the loop (chat streams stalled meanwhile), 5.4 MB with
    17-digit doubles; orjson 0.017 s and 3.1 MB, exact. A NaN (a broken model) becomes null
    where json.dumps refused it with a 500."""
    import numpy as np
    import orjson

    def contiguous(value: Any) -> Any:  # orjson writes C-contiguous arrays only (not a cut)
        if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
            return np.ascontiguousarray(value)
        raise TypeError(f"{type(value).__name__} is not JSON")

    content = await off_loop(orjson.dumps, payload, contiguous, orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, media_type="application/json")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) as soon as the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone


async def _disconnected(request: Request) -> None:
    # The body was read already; the next message from the server is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class GenerationStream(StreamingResponse):
    """A streamed answer that releases its model and request however the response ends, even
    when the client leaves before the body iterator has started."""

    def __init__(self, content: AsyncIterator[bytes], stack: contextlib.AsyncExitStack,
                 media_type: str) -> None:
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stack = stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stack.aclose()


# -- pieces a dialect may need beyond OpenAI's ------------------------------------------------


def start_generation(model: LoadedModel, prompt_tokens: list[int], sampling: SamplingParams,
                     max_tokens: int, stop: list[str], metrics: Metrics, *,
                     thinking_budget: int | None = None) -> Generation:
    """A Generation whose thinking the engine closes after `thinking_budget` tokens."""
    return Generation(model, prompt_tokens, sampling, max_tokens, stop, metrics,
                      thinking_budget=thinking_budget)


class Cancellable(Protocol):
    """What a stop string ends: a Generation, or an upstream's answer."""

    def cancel(self) -> None: ...


class AnswerStops:
    """Stop strings matched here rather than in the engine, over the text the dialect chooses
    (the answer, not the thinking), so it can say which one matched (Anthropic's
    `stop_sequence`). At a match the request is cancelled: the engine stops within a step and
    still reports its token counts, which the caller reads by draining `texts()` to the end."""

    def __init__(self, generation: Cancellable, stops: list[str]) -> None:
        self._generation = generation
        self._matcher = StopMatcher(stops)
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    def feed(self, text: str) -> str:
        """What of `text` may be shown now (nothing once a stop string has appeared)."""
        if self._matcher.stopped:
            return ""
        seen = self._matcher.pending + text
        out = self._matcher.feed(text)
        if self._matcher.stopped:
            at = {stop: seen.find(stop) for stop in self._matcher.stops if stop in seen}
            self.matched = min(at, key=lambda stop: at[stop])
            self._generation.cancel()
        return out

    def flush(self) -> str:
        return self._matcher.flush()


def grammar_waits_for_thinking(model: LoadedModel) -> bool:
    """Whether a grammar can leave the thinking free and shape only what follows `</think>`:
    the template thinks and `<think>`, `</think>` are single tokens (Qwen3)."""
    return model.formatter.supports_thinking and model.runtime.think is not None


# -- embeddings (dialect-neutral: /v1/embeddings, /v1/rerank and Ollama's /api/embed) ----------

MAX_EMBEDDING_INPUTS = 2048  # per request, as OpenAI bounds it


@dataclass
class Embedded:
    """Normalized vectors, one row per input, and the tokens read."""

    model_id: str
    vectors: Any  # numpy float32 array (inputs x dimensions)
    prompt_tokens: int


def embedding_inputs(raw: Any, param: str = "input") -> list[str] | list[list[int]]:
    """A string, strings, a token array or token arrays → a list of texts or of token lists;
    anything else (empty, mixed, too many) is a 400 naming the field."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest(f"{param} must be a non-empty string or array", param=param)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        raw = [raw]  # one token array
    if len(raw) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"{param} has {len(raw)} items; at most {MAX_EMBEDDING_INPUTS} "
                             "per request", param=param)
    texts = isinstance(raw[0], str)  # the first item sets the form; the odd one out is named
    for i, item in enumerate(raw):
        where = f"{param}.{i}" if len(raw) > 1 or not texts else param
        if texts:
            if not isinstance(item, str):
                raise InvalidRequest(f"{where} must be a string (strings and token arrays "
                                     "cannot be mixed)", param=where)
            if not item:
                raise InvalidRequest(f"{where} is an empty string", param=where)
        elif not (isinstance(item, list) and item and all(
                isinstance(t, int) and not isinstance(t, bool) for t in item)):
            raise InvalidRequest(f"{where} must be a non-empty array of token ids (strings and "
                                 "token arrays cannot be mixed)", param=where)
    return raw


def _tokenized(model: Any, inputs: list[str] | list[list[int]], param: str,
               truncate: bool = False) -> list[list[int]]:
    """Blocking: tokens for every input, each checked against the vocabulary and the limit
    (`truncate`: an input over it is cut to it, as Ollama does)."""
    from appliance.errors import ContextOverflow  # (this block is appended to the module)

    limit = model.max_input_tokens
    if isinstance(inputs[0], str):
        tokens = model.tokenize(inputs, limit if truncate else None)
    else:
        tokens = [model.check_tokens(ids, f"{param}.{i}")[:limit if truncate else None]
                  for i, ids in enumerate(inputs)]
    for i, ids in enumerate(tokens):
        if len(ids) > limit:
            where = f"{param}.{i}" if len(tokens) > 1 else param
            raise ContextOverflow(f"{where} has {len(ids)} tokens; model {model.id} embeds at "
                                  f"most {limit} per input", param=where)
    return tokens


async def embed_inputs(model: Any, inputs: list[str] | list[list[int]],
                       param: str = "input", truncate: bool = False) -> Embedded:
    """Embed on the model's own worker thread (many inputs per llama.cpp decode); cancelling the
    awaiting task withdraws the job."""
    if getattr(model, "reranker", False):
        raise InvalidRequest(f"model {model.id} is a reranker: it scores (query, document) pairs "
                             "at /v1/rerank and gives no embeddings; name an embedding model",
                             param="model")
    tokens = await asyncio.to_thread(_tokenized, model, inputs, param, truncate)
    rows = await _run_embedding_job(model, tokens)
    return Embedded(model.id, rows, sum(len(t) for t in tokens))


async def _run_embedding_job(model: Any, tokens: list[list[int]]) -> Any:
    """One job on the model's worker; cancelling the awaiting task withdraws it."""
    from appliance.engine.embedding import EmbeddingJob

    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(rows: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(rows)

    def done(rows: Any, error: BaseException | None) -> None:  # worker thread
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            loop.call_soon_threadsafe(settle, rows, error)

    job = EmbeddingJob(tokens, done)
    model.submit(job)
    try:
        return await future
    finally:
        job.cancelled = True  # a no-op once done; otherwise the worker skips or stops it


def _rerank_tokenized(model: Any, query: str, documents: list[str], instruction: str | None,
                      param: str) -> list[list[int]]:
    """Blocking: every pair's prompt tokens, each within the model's limit (a 400 names the
    document, or the query when it alone leaves no room)."""
    from appliance.errors import ContextOverflow

    limit = model.max_input_tokens
    bare = model.rerank_tokens(query, [""], instruction)[0]
    if len(bare) > limit:
        raise ContextOverflow(f"query: the prompt with the query alone has {len(bare)} tokens; "
                              f"model {model.id} reads at most {limit} per pair", param="query")
    tokens = model.rerank_tokens(query, documents, instruction)
    for i, ids in enumerate(tokens):
        if len(ids) > limit:
            raise ContextOverflow(f"{param}.{i}: the query and this document take {len(ids)} "
                                  f"tokens; model {model.id} reads at most {limit} per pair",
                                  param=f"{param}.{i}")
    return tokens


async def rerank_pairs(model: Any, query: str, documents: list[str], instruction: str | None,
                       param: str = "documents") -> Embedded:
    """A reranker's score for each (query, document) pair, all pairs in one job on its worker
    (packed many to a llama.cpp decode, as embeddings are); `vectors` holds one score a row."""
    tokens = await asyncio.to_thread(_rerank_tokenized, model, query, documents, instruction,
                                     param)
    scores = await _run_embedding_job(model, tokens)
    return Embedded(model.id, scores, sum(len(t) for t in tokens))


def truncate_dimensions(vectors: Any, dimensions: int | None, model_dims: int,
                        param: str = "dimensions") -> Any:
    """Matryoshka truncation to `dimensions`, then re-normalization; above the model's size
    is a 400."""
    import numpy as np

    if dimensions is None or dimensions == model_dims:
        return vectors
    if not 1 <= dimensions <= model_dims:
        raise InvalidRequest(f"{param} must be between 1 and {model_dims} for this model",
                             param=param)
    cut = vectors[:, :dimensions]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
