"""/v1/embeddings (OpenAI's shape) and /v1/rerank (llama-server's and Jina's shape).

Both serve embedding models only (a GGUF with a pooling type, e.g. Qwen3-Embedding): a chat
model named here is refused with the installed embedding models named, rather than pooled, so
one file never holds two contexts and an app never gets vectors it did not ask for.
The work itself is in core (embed_inputs), which Ollama's /api/embed calls too.
"""

from __future__ import annotations

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
    truncate_dimensions,
    until_disconnect,
)
from appliance.api.deps import ManagerDep, UpstreamsDep
from appliance.api.schemas import RequestBody, _Lenient
from appliance.errors import InvalidRequest
from appliance.residency.model import EMBEDDING
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
    instruction: StrictStr | None = Field(None, max_length=2000)
    keep_alive: float | None = Field(None, ge=-1, le=MAX_KEEP_ALIVE_S)


def _encode(row: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(row.astype("<f4").tobytes()).decode()
    return row.tolist()


@router.post("/v1/embeddings", response_model=None)
async def embeddings(body: EmbeddingsRequest, request: Request, manager: ManagerDep,
                     upstreams: UpstreamsDep) -> Response:
    inputs = embedding_inputs(body.input)  # bounded here, for upstream models too
    if (answer := await routed(upstreams, request, body.model, "embeddings")) is not None:
        return answer
    async with manager.use(body.model, kind=EMBEDDING, keep_alive_s=body.keep_alive) as model:
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
    return JSONResponse({"object": "list", "data": data, "model": result.model_id,
                         "usage": {"prompt_tokens": result.prompt_tokens,
                                   "total_tokens": result.prompt_tokens}})


@router.post("/v1/rerank", response_model=None)
async def rerank(body: RerankRequest, request: Request, manager: ManagerDep) -> Response:
    documents = [d if isinstance(d, str) else d.text for d in body.documents]
    for i, text in enumerate(documents):
        if not text:
            raise InvalidRequest(f"documents.{i} is an empty string", param=f"documents.{i}")
    instruction = DEFAULT_INSTRUCTION if body.instruction is None else body.instruction
    query = f"Instruct: {instruction}\nQuery: {body.query}" if instruction else body.query
    async with manager.use(body.model, kind=EMBEDDING, keep_alive_s=body.keep_alive) as model:
        try:
            result = await until_disconnect(request, embed_inputs(model, [query, *documents],
                                                                  param="documents"))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    scores = result.vectors[1:] @ result.vectors[0]  # cosine: the rows are normalized
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
