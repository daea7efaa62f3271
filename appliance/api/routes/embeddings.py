"""/v1/embeddings (OpenAI's shape) and /v1/rerank (llama-server's and Jina's shape).

Both serve embedding models only (a GGUF with a pooling type, e.g. Qwen3-Embedding): a chat
model named here is refused with the installed embedding models named, rather than pooled, so
one file never holds two contexts and an app never gets vectors it did not ask for.
/v1/rerank scores with a reranker (Qwen3-Reranker: P("yes") for each pair's prompt) when one is
named, or when none is named and one is installed; with an embedding model it ranks by cosine.
The work itself is in core (embed_inputs, rerank_pairs), which Ollama's /api/embed calls too.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StrictStr

from appliance.api.core import (
    MAX_EMBEDDING_INPUTS,
    ClientGone,
    embed_inputs,
    embedding_inputs,
    rerank_pairs,
    truncate_dimensions,
    until_disconnect,
    vectors_response,
)
from appliance.api.deps import ManagerDep, UpstreamsDep
from appliance.api.schemas import RequestBody, _Lenient
from appliance.errors import InvalidRequest
from appliance.residency.manager import ModelManager
from appliance.residency.model import EMBEDDING, is_reranker, model_kind
from appliance.upstream.proxy import routed

router = APIRouter()
CLIENT_GONE = 499
# Qwen3-Embedding's recommended query instruction; documents are embedded as they are.
DEFAULT_INSTRUCTION = ("Given a web search query, retrieve relevant passages that answer the "
                       "query")
MAX_KEEP_ALIVE_S = 7 * 24 * 3600.0


class EmbeddingsRequest(RequestBody):
    model: str | None = Field(None, max_length=256)
    # Checked by core.embedding_inputs, which names the offending item (input.3).
    input: Any = Field(description="a string, strings, a token array or token arrays")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    keep_alive: float | None = Field(None, ge=-1, le=MAX_KEEP_ALIVE_S,
                                     description="seconds to stay loaded after this request")


class RerankDocument(_Lenient):
    text: StrictStr


class RerankRequest(RequestBody):
    model: str | None = Field(None, max_length=256)
    query: StrictStr = Field(min_length=1)
    documents: list[StrictStr | RerankDocument] = Field(min_length=1,
                                                        max_length=MAX_EMBEDDING_INPUTS - 1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    # Replaces the default task in the query instruction (the reranker's <Instruct>).
    instruction: StrictStr | None = Field(None, max_length=2000)
    keep_alive: float | None = Field(None, ge=-1, le=MAX_KEEP_ALIVE_S)


def _encode(row: np.ndarray, encoding: str) -> np.ndarray | str:
    if encoding == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(row.astype("<f4").tobytes()).decode()
    return row


@router.post("/v1/embeddings", response_model=None)
async def embeddings(body: EmbeddingsRequest, request: Request, manager: ManagerDep,
                     upstreams: UpstreamsDep) -> Response:
    inputs = embedding_inputs(body.input)  # bounded here, for upstream models too
    if (answer := await routed(upstreams, request, body.model, "embeddings")) is not None:
        return answer
    name = body.model or await asyncio.to_thread(_default_model, manager, False)
    async with manager.use(name, kind=EMBEDDING, keep_alive_s=body.keep_alive) as model:
        if body.dimensions is not None and body.dimensions > model.dimensions:
            raise InvalidRequest(f"dimensions must be at most {model.dimensions} for "
                                 f"{model.id}", param="dimensions")
        try:
            result = await until_disconnect(request, embed_inputs(model, inputs))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        vectors = truncate_dimensions(result.vectors, body.dimensions, model.dimensions)
    data = [{"object": "embedding", "index": i, "embedding": _encode(row, body.encoding_format)}
            for i, row in enumerate(vectors)]
    return await vectors_response({"object": "list", "data": data, "model": result.model_id,
                                   "usage": {"prompt_tokens": result.prompt_tokens,
                                             "total_tokens": result.prompt_tokens}})


def _default_model(manager: ModelManager, reranker: bool) -> str | None:
    """Blocking (scans the folder): for a request that names no model, the most recently used
    resident reranker (or embedding model, as `reranker` says), else the first installed one;
    None leaves the choice to the manager. Rerankers and embedding models share a kind, so
    without this /v1/embeddings could land on a reranker that /v1/rerank just used."""
    resident = [m for m in list(manager.resident.values())
                if m.kind == EMBEDDING and getattr(m, "reranker", False) == reranker]
    if resident:
        return max(resident, key=lambda m: m.last_used).id
    return next((e.id for e in manager.registry.scan()
                 if e.usable and model_kind(e) == EMBEDDING and is_reranker(e) == reranker), None)


@router.post("/v1/rerank", response_model=None)
async def rerank(body: RerankRequest, request: Request, manager: ManagerDep) -> Response:
    documents = [d if isinstance(d, str) else d.text for d in body.documents]
    for i, text in enumerate(documents):
        if not text:
            raise InvalidRequest(f"documents.{i} is an empty string", param=f"documents.{i}")
    name = body.model or await asyncio.to_thread(_default_model, manager, True)
    async with manager.use(name, kind=EMBEDDING, keep_alive_s=body.keep_alive) as model:
        try:
            if model.reranker:
                result = await until_disconnect(request, rerank_pairs(
                    model, body.query, documents, body.instruction))
                scores = result.vectors
            else:
                result, scores = await _cosine_scores(request, model, body, documents)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    order = np.argsort(-scores, kind="stable")[:body.top_n or len(documents)]
    results: list[dict[str, Any]] = []
    for index in order:
        item: dict[str, Any] = {"index": int(index), "relevance_score": float(scores[index])}
        if body.return_documents:
            item["document"] = {"text": documents[index]}
        results.append(item)
    return JSONResponse({"model": result.model_id, "object": "list", "results": results,
                         "usage": {"prompt_tokens": result.prompt_tokens,
                                   "total_tokens": result.prompt_tokens}})


async def _cosine_scores(request: Request, model: Any, body: RerankRequest,
                         documents: list[str]) -> tuple[Any, np.ndarray]:
    """An embedding model's ranking: the instructed query's cosine with each document."""
    instruction = DEFAULT_INSTRUCTION if body.instruction is None else body.instruction
    query = f"Instruct: {instruction}\nQuery: {body.query}" if instruction else body.query
    result = await until_disconnect(request, embed_inputs(model, [query, *documents],
                                                          param="documents"))
    return result, result.vectors[1:] @ result.vectors[0]  # cosine: the rows are normalized
