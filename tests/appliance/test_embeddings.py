"""/v1/embeddings and /v1/rerank on a real daemon: the tiny Qwen3-Embedding GGUF (converted by
our converter) beside the tiny chat model, the official openai client, transformers' vectors as
the reference, and every refusal in OpenAI's error shape naming the field."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.appliance.conftest import FOREVER, Daemon, run_daemon
from tests.conftest import EMBED, MODEL_A

TEXTS = ["The capital of France is Paris.", "def add(a, b): return a + b",
         "你好，世界", "Grüße aus Köln", "x"]


@pytest.fixture(scope="module")
def daemon(tiny_gguf: Path, tiny_embedding_gguf: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    folder = tmp_path_factory.mktemp("embedding-models")
    shutil.copy(tiny_gguf, folder / f"{MODEL_A}.gguf")
    shutil.copy(tiny_embedding_gguf, folder / f"{EMBED}.gguf")
    with run_daemon(folder, tmp_path_factory.mktemp("daemon"), default_model=MODEL_A,
                    parallel="2") as d:
        yield d


@pytest.fixture()
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.base_url, api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def reference(folder: Path, texts: list[str]) -> np.ndarray:
    from converter.verify_embedding import hf_ids, reference_embeddings

    return reference_embeddings(folder, hf_ids(folder, texts))


def test_vector_answers_are_float32_at_their_shortest_and_nan_is_null() -> None:
    """orjson off the loop: each number reads back as the same float32; a NaN (a broken model)
    is null, where json.dumps refused it with a 500; a cut (non-contiguous) array is fine."""
    from appliance.api.core import vectors_response

    rows = np.array([[0.1, 1 / 3, 7e-8], [0.25, -2.0, np.nan]], dtype=np.float32)
    answer = asyncio.run(vectors_response({"data": rows, "cut": rows[:, :2]}))
    data = json.loads(answer.body)
    assert answer.media_type == "application/json" and b"[0.1," in answer.body
    assert data["data"][1][2] is None
    assert np.array_equal(np.array(data["data"][0], dtype=np.float32), rows[0])
    assert np.array_equal(np.array(data["cut"], dtype=np.float32), rows[:, :2])


def test_vectors_match_transformers_in_every_input_form(client: openai.OpenAI,
                                                        tiny_embedding_checkpoint: Path) -> None:
    result = client.embeddings.create(model=EMBED, input=TEXTS)  # the client asks for base64
    got = np.array([d.embedding for d in result.data])
    assert [d.index for d in result.data] == list(range(len(TEXTS)))
    ref = reference(tiny_embedding_checkpoint, TEXTS)
    cosine = np.sum(got * ref, axis=1)
    assert cosine.min() > 0.99, cosine  # Q8_0 against float32 transformers
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
    from converter.verify_embedding import hf_ids

    ids = hf_ids(tiny_embedding_checkpoint, TEXTS)
    assert result.usage.prompt_tokens == sum(len(i) for i in ids)
    as_floats = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    floats = np.array([d.embedding for d in as_floats.data], dtype=np.float32)
    assert np.array_equal(floats, got.astype(np.float32))  # the same float32s, in JSON
    as_tokens = client.embeddings.create(model=EMBED, input=ids)
    assert np.allclose([d.embedding for d in as_tokens.data], got, atol=1e-4)
    one = client.embeddings.create(model=EMBED, input=TEXTS[0])
    assert np.allclose(one.data[0].embedding, got[0], atol=1e-4)  # batched == alone
    short = client.embeddings.create(model=EMBED, input=TEXTS, dimensions=16)
    cut = got[:, :16] / np.linalg.norm(got[:, :16], axis=1, keepdims=True)
    assert np.allclose([d.embedding for d in short.data], cut, atol=1e-4)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["a", ""]}, "input.1"),
    ({"input": ["a"] * 2049}, "input"),
    ({"input": ["a", "hello " * 5000]}, "input.1"),
    ({"input": [[1, 2], [10**9]]}, "input.1"),
    ({"input": [[1, 2], [5] * 100_000]}, "input.1"),  # a token array over the context
    ({"input": ["a", 3]}, "input.1"),
    ({"input": "a", "dimensions": 65}, "dimensions"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "keep_alive": 10**12}, "keep_alive"),
])
def test_bad_input_is_a_400_naming_the_field(daemon: Daemon, body: dict, param: str) -> None:
    with daemon.http() as http:
        r = http.post("/v1/embeddings", json={"model": EMBED, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_models_of_the_wrong_kind_are_refused_by_name(daemon: Daemon) -> None:
    with daemon.http() as http:
        r = http.post("/v1/embeddings", json={"model": MODEL_A, "input": "a"})
        assert r.status_code == 400 and EMBED in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={
            "model": EMBED, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]


def test_rerank_sorts_documents_by_relevance(daemon: Daemon,
                                             tiny_embedding_checkpoint: Path) -> None:
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "SELECT 1;"]
    with daemon.http() as http:
        r = http.post("/v1/rerank", json={"model": EMBED, "query": "capital of France",
                                          "documents": docs, "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(x["index"] for x in results) == [0, 1, 2]
    assert all(x["document"]["text"] == docs[x["index"]] for x in results)
    from converter.verify_embedding import QUERY_INSTRUCTION, hf_ids, reference_embeddings

    ref = reference_embeddings(tiny_embedding_checkpoint, hf_ids(
        tiny_embedding_checkpoint, [QUERY_INSTRUCTION + "capital of France", *docs]))
    expected = list(np.argsort(-(ref[1:] @ ref[0]), kind="stable"))
    assert [x["index"] for x in results] == expected


def test_chat_and_embeddings_at_once_without_reloads(daemon: Daemon,
                                                     client: openai.OpenAI) -> None:
    generated: list[int] = []

    def chat() -> None:
        stream = client.chat.completions.create(
            model=MODEL_A, messages=[{"role": "user", "content": "go"}], max_tokens=48,
            stream=True, stream_options={"include_usage": True}, extra_body=FOREVER)
        generated.extend(c.usage.completion_tokens for c in stream if c.usage)

    worker = threading.Thread(target=chat)
    worker.start()
    result = client.embeddings.create(model=EMBED, input=[f"chunk {i} " * 8 for i in range(96)])
    worker.join(120)
    assert not worker.is_alive() and generated == [48]
    assert len(result.data) == 96
    status = httpx.get(daemon.url + "/api/status", timeout=30).json()
    models = {m["id"]: m for m in status["models"]}
    assert set(models) == {MODEL_A, EMBED}
    assert models[MODEL_A]["loads"] == 1 and models[EMBED]["loads"] == 1
    assert models[EMBED]["kind"] == "embedding" and models[EMBED]["pooling"] == "last"
    assert models[EMBED]["memory"]["planned_ram"] > 0
    assert status["model"]["id"] == MODEL_A


def test_ollamas_embed_truncates_an_input_over_the_limit_keeping_its_end_token(
        daemon: Daemon, client: openai.OpenAI) -> None:
    """Ollama's `truncate` (on by default): an input over the model's limit loses the end of
    its text; the end-of-text token the model pools on stays. `truncate: false`: a 400."""
    import ollama

    theirs = ollama.Client(host=daemon.url)
    specials = client.embeddings.create(model=EMBED, input="word").usage.prompt_tokens - 1
    status = httpx.get(daemon.url + "/api/status", timeout=30).json()
    limit = next(m for m in status["models"] if m["id"] == EMBED)["max_input_tokens"]
    long_text = " ".join(["word"] * (2 * limit))
    cut = theirs.embed(model=EMBED, input=[long_text, "short"])
    assert cut.prompt_eval_count == limit + client.embeddings.create(
        model=EMBED, input="short").usage.prompt_tokens
    kept = " ".join(["word"] * (limit - specials))  # the words that fit, then the special(s)
    expected = client.embeddings.create(model=EMBED, input=kept, encoding_format="float")
    assert expected.usage.prompt_tokens == limit
    assert np.allclose(cut.embeddings[0], expected.data[0].embedding, atol=1e-4)
    with pytest.raises(ollama.ResponseError) as refused:
        theirs.embed(model=EMBED, input=long_text, truncate=False)
    assert refused.value.status_code == 400 and "tokens" in refused.value.error
    with pytest.raises(openai.BadRequestError):  # the OpenAI dialect never truncates
        client.embeddings.create(model=EMBED, input=long_text)


def test_ollamas_embed_routes_use_the_same_core(daemon: Daemon, client: openai.OpenAI) -> None:
    import ollama

    theirs = ollama.Client(host=daemon.url)
    ours = np.array([d.embedding for d in client.embeddings.create(
        model=EMBED, input=TEXTS[:2], encoding_format="float").data])
    embedded = theirs.embed(model=EMBED, input=TEXTS[:2])
    assert np.allclose(np.array(embedded.embeddings), ours, atol=1e-5)
    assert embedded.prompt_eval_count > 0
    legacy = theirs.embeddings(model=EMBED, prompt=TEXTS[0])
    assert np.allclose(np.array(legacy.embedding), ours[0], atol=1e-5)
    with pytest.raises(ollama.ResponseError) as chat_model:
        theirs.embed(model=MODEL_A, input="x")
    assert chat_model.value.status_code == 400 and EMBED in chat_model.value.error
