"""Hostile and careless input to the Ollama API, against a real daemon: every probe gets a clear
4xx in Ollama's shape (`{"error": "message"}`), never a 500 or a crash, and the daemon is
healthy, with no slot held, at the end. The same standard as test_hostile.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.appliance.conftest import Daemon, run_daemon
from tests.appliance.test_hostile import CRAFTED, deep_body, deep_value, gguf_header
from tests.conftest import MODEL_A

ALLOWED_ORIGIN = "http://app.example:3000"
EVIL_ORIGIN = "http://evil.example"
USER = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_A, "messages": USER, "stream": False,
            "options": {"num_predict": 1}, **fields}


def generate(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_A, "prompt": "hi", "stream": False,
            "options": {"num_predict": 1}, **fields}


def options(**values: Any) -> dict[str, Any]:
    return chat(options={"num_predict": 1, **values})


@pytest.fixture(scope="module")
def target(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    folder = tmp_path_factory.mktemp("hostile-ollama-models")
    for path in models_dir.glob("*.gguf"):
        (folder / path.name).symlink_to(path)
    (folder / "zero-alignment.gguf").write_bytes(gguf_header(CRAFTED["zero-alignment"]))
    with run_daemon(folder, tmp_path_factory.mktemp("hostile-ollama"), default_model=MODEL_A,
                    parallel="2", max_queue="2", max_body_bytes="65536",
                    cors_origins=json.dumps([ALLOWED_ORIGIN])) as daemon:
        yield daemon


# (name, method, path, request keyword arguments, accepted statuses)
PROBES: list[tuple[str, str, str, dict[str, Any], set[int]]] = [
    # options: Ollama's names with their types and bounds; unknown ones only as small scalars
    ("temperature as text", "POST", "/api/chat", {"json": options(temperature="hot")}, {400}),
    ("negative temperature", "POST", "/api/chat", {"json": options(temperature=-1)}, {400}),
    ("options not an object", "POST", "/api/chat", {"json": chat(options=5)}, {400}),
    ("options a list", "POST", "/api/generate", {"json": generate(options=[1, 2])}, {400}),
    ("astronomic num_predict", "POST", "/api/chat", {"json": options(num_predict=10**30)},
     {400}),
    ("num_predict below -2", "POST", "/api/chat", {"json": options(num_predict=-3)}, {400}),
    ("huge num_predict within a small num_ctx", "POST", "/api/generate",
     {"json": generate(raw=True, options={"num_predict": 2**31 - 1, "num_ctx": 8})}, {200}),
    ("num_ctx past the slot", "POST", "/api/chat", {"json": options(num_ctx=10**6)}, {400}),
    ("num_ctx zero", "POST", "/api/chat", {"json": options(num_ctx=0)}, {400}),
    ("num_ctx astronomic", "POST", "/api/chat", {"json": options(num_ctx=10**30)}, {400}),
    ("huge top_k", "POST", "/api/chat", {"json": options(top_k=10**12)}, {400}),
    ("top_p above 1", "POST", "/api/chat", {"json": options(top_p=1.5)}, {400}),
    ("huge seed", "POST", "/api/chat", {"json": options(seed=10**30)}, {400}),
    ("seed -1 (random)", "POST", "/api/chat", {"json": options(seed=-1)}, {200}),
    ("repeat_penalty zero", "POST", "/api/chat", {"json": options(repeat_penalty=0)}, {400}),
    ("17 stop strings", "POST", "/api/chat",
     {"json": options(stop=[str(i) for i in range(17)])}, {400}),
    ("a 10k-character stop string", "POST", "/api/chat", {"json": options(stop=["x" * 10000])},
     {400}),
    ("stop as a number", "POST", "/api/chat", {"json": options(stop=[5])}, {400}),
    ("num_thread as text", "POST", "/api/chat", {"json": options(num_thread="many")}, {400}),
    ("use_mmap as a list", "POST", "/api/chat", {"json": options(use_mmap=[True])}, {400}),
    ("unknown option, small", "POST", "/api/chat", {"json": options(flux_capacitor=1.21)},
     {200}),
    ("unknown option, nested", "POST", "/api/chat",
     {"json": options(flux_capacitor={"a": [[[1]]]})}, {400}),
    ("unknown option, 10k text", "POST", "/api/chat", {"json": options(note="x" * 10000)},
     {400}),
    ("100 unknown options", "POST", "/api/chat",
     {"json": options(**{f"o{i}": i for i in range(100)})}, {400}),
    ("known but ineffective options", "POST", "/api/generate",
     {"json": generate(options={"num_predict": 1, "mirostat": 2, "num_gpu": 99,
                                "num_thread": 8, "repeat_last_n": 33, "typical_p": 0.7,
                                "use_mmap": False})}, {200}),
    # keep_alive
    ("keep_alive words", "POST", "/api/chat", {"json": chat(keep_alive="forever")}, {400}),
    ("keep_alive boolean", "POST", "/api/chat", {"json": chat(keep_alive=True)}, {400}),
    ("keep_alive NaN text", "POST", "/api/chat", {"json": chat(keep_alive="nan")}, {400}),
    ("keep_alive half a unit", "POST", "/api/chat", {"json": chat(keep_alive="5mx")}, {400}),
    ("keep_alive 1000 characters", "POST", "/api/chat", {"json": chat(keep_alive="1" * 1000)},
     {400}),
    ("keep_alive an object", "POST", "/api/chat", {"json": chat(keep_alive={"m": 5})}, {400}),
    ("keep_alive Go duration", "POST", "/api/chat", {"json": chat(keep_alive="1h30m")}, {200}),
    ("keep_alive past a century", "POST", "/api/chat", {"json": chat(keep_alive="9999999h")},
     {200}),
    # fields we cannot honour are refused, not ignored
    ("images in a message", "POST", "/api/chat",
     {"json": chat(messages=[{"role": "user", "content": "?", "images": ["aGk="]}])}, {400}),
    ("images in generate", "POST", "/api/generate", {"json": generate(images=["aGk="])}, {400}),
    ("a Go template", "POST", "/api/generate", {"json": generate(template="{{ .Prompt }}")},
     {400}),
    ("suffix", "POST", "/api/generate", {"json": generate(suffix="end")}, {400}),
    ("context tokens", "POST", "/api/generate", {"json": generate(context=[1, 2, 3])}, {400}),
    ("logprobs", "POST", "/api/chat", {"json": chat(logprobs=True)}, {400}),
    ("top_logprobs", "POST", "/api/generate", {"json": generate(top_logprobs=5)}, {400}),
    ("think extreme", "POST", "/api/chat", {"json": chat(think="extreme")}, {400}),
    ("format xml", "POST", "/api/chat", {"json": chat(format="xml")}, {400}),
    ("format a number", "POST", "/api/chat", {"json": chat(format=5)}, {400}),
    ("format a list", "POST", "/api/generate", {"json": generate(format=["json"])}, {400}),
    ("format maxLength 100000", "POST", "/api/chat",
     {"json": chat(format={"type": "string", "maxLength": 100000})}, {400}),
    ("format nested 1000 deep", "POST", "/api/generate", deep_body(generate(format="DEEP"), 1000),
     {400}),
    ("tool call arguments nested 500 deep", "POST", "/api/chat", deep_value(chat(messages=[
        *USER, {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": "DEEP"}}]}]), 500), {400}),
    # messages, tools, names
    ("unknown role", "POST", "/api/chat",
     {"json": chat(messages=[{"role": "root", "content": "x"}])}, {400}),
    ("messages a string", "POST", "/api/chat", {"json": chat(messages="hi")}, {400}),
    ("content an object", "POST", "/api/chat",
     {"json": chat(messages=[{"role": "user", "content": {"a": 1}}])}, {400}),
    ("tool call arguments as text", "POST", "/api/chat",
     {"json": chat(messages=[*USER, {"role": "assistant", "content": "", "tool_calls": [
         {"function": {"name": "f", "arguments": "{\"a\": 1}"}}]}])}, {400}),
    ("200 tools", "POST", "/api/chat",
     {"json": chat(tools=[{"type": "function", "function": {"name": "f"}}] * 200)}, {400}),
    ("tool without a name", "POST", "/api/chat",
     {"json": chat(tools=[{"type": "function", "function": {"name": ""}}])}, {400}),
    ("lone surrogate in content", "POST", "/api/chat",
     {"content": b'{"model":"' + MODEL_A.encode() + b'","messages":[{"role":"user",'
                 b'"content":"a\\ud800b"}]}', "headers": JSON}, {400}),
    ("lone surrogate in a stop string", "POST", "/api/generate",
     {"content": b'{"model":"' + MODEL_A.encode() + b'","prompt":"x",'
                 b'"options":{"stop":["\\udfff"]}}', "headers": JSON}, {400}),
    ("lone surrogate in the prompt", "POST", "/api/generate",
     {"content": b'{"model":"' + MODEL_A.encode() + b'","prompt":"\\ud83d"}',
      "headers": JSON}, {400}),
    ("no model", "POST", "/api/chat", {"json": chat(model="")}, {400}),
    ("a 10k-character model name", "POST", "/api/chat", {"json": chat(model="m" * 10000)},
     {400}),
    ("traversal in a model name", "POST", "/api/chat",
     {"json": chat(model="../../../etc/passwd")}, {404}),
    ("NUL in a model name", "POST", "/api/generate", {"json": generate(model="a\u0000b")},
     {404}),
    ("crafted header model", "POST", "/api/chat", {"json": chat(model="zero-alignment")},
     {422}),
    ("show without a model", "POST", "/api/show", {"json": {}}, {400}),
    ("show an unknown model", "POST", "/api/show", {"json": {"model": "nope:1b"}}, {404}),
    ("embed an unknown model", "POST", "/api/embed", {"json": {"model": "nope"}}, {404}),
    ("embed truncate as text", "POST", "/api/embed",
     {"json": {"model": MODEL_A, "input": "x", "truncate": "lots"}}, {400}),
    ("embed truncate as a list", "POST", "/api/embed",
     {"json": {"model": MODEL_A, "input": "x", "truncate": [True]}}, {400}),
    # bodies
    ("invalid json", "POST", "/api/chat", {"content": b"{not json", "headers": JSON}, {400}),
    ("a json list", "POST", "/api/generate", {"json": [1, 2]}, {400}),
    ("empty body", "POST", "/api/chat", {"content": b"", "headers": JSON}, {400}),
    ("deeply nested json", "POST", "/api/chat",
     {"content": b"[" * 5000 + b"]" * 5000, "headers": JSON}, {400}),
    ("content-length over the limit", "POST", "/api/generate",
     {"content": b"{" + b" " * 70000 + b"}", "headers": JSON}, {413}),
    ("text/plain body (curl -d without a type)", "POST", "/api/generate",
     {"content": json.dumps(generate()), "headers": {"Content-Type": "text/plain"}}, {415}),
    # a web page may not drive the daemon through the Ollama paths either
    ("chat from a page", "POST", "/api/chat", {"json": chat(), "headers": {"Origin": EVIL_ORIGIN}},
     {403}),
    ("no-cors pull from a page", "POST", "/api/pull",
     {"content": b"{}", "headers": {"Origin": EVIL_ORIGIN, "Content-Type": "text/plain"}},
     {403}),
    ("delete from a page", "DELETE", "/api/delete",
     {"json": {"model": MODEL_A}, "headers": {"Origin": EVIL_ORIGIN}}, {403}),
    ("unload from a page (keep_alive 0)", "POST", "/api/generate",
     {"json": {"model": MODEL_A, "keep_alive": 0}, "headers": {"Origin": "null"}}, {403}),
    ("chat from the allowed page", "POST", "/api/chat",
     {"json": chat(), "headers": {"Origin": ALLOWED_ORIGIN}}, {200}),
    ("tags from a page (a read)", "GET", "/api/tags", {"headers": {"Origin": EVIL_ORIGIN}},
     {200}),
    # not here yet: a clear status, never a 404 or 500
    ("pull of a name that is no hub repo", "POST", "/api/pull", {"json": {"model": "qwen3:8b"}},
     {400, 404}),
    ("pull with traversal", "POST", "/api/pull", {"json": {"model": "../../etc/passwd"}},
     {400, 403, 404}),
    ("delete of an unknown model", "DELETE", "/api/delete", {"json": {"model": "absent-model"}},
     {404}),
    ("create", "POST", "/api/create", {"json": {"model": "x"}}, {501}),
    ("wrong method", "GET", "/api/generate", {}, {405}),
]

@pytest.mark.parametrize("name,method,path,kwargs,expected", PROBES, ids=[p[0] for p in PROBES])
def test_probe_gets_a_clear_answer(target: Daemon, name: str, method: str, path: str,
                                   kwargs: dict[str, Any], expected: set[int]) -> None:
    with httpx.Client(base_url=target.url, timeout=60) as http:
        r = http.request(method, path, **kwargs)
    assert r.status_code in expected, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error, str) and error, r.text[:300]  # Ollama's shape
    assert target.process.poll() is None, "the daemon died:\n" + target.log()[-3000:]


def test_errors_name_the_field(target: Daemon) -> None:
    with httpx.Client(base_url=target.url, timeout=60) as http:
        temperature = http.post("/api/chat", json=options(temperature="hot"))
        surrogate = http.post("/api/chat", headers=JSON, content=(
            b'{"model":"x","messages":[{"role":"user","content":"\\ud800"}]}'))
        keep_alive = http.post("/api/chat", json=chat(keep_alive="forever"))
    assert temperature.json()["error"].startswith("options.temperature")
    assert "messages.0.content" in surrogate.json()["error"]
    assert "keep_alive" in keep_alive.json()["error"]


def status(daemon: Daemon) -> dict[str, Any]:
    with httpx.Client(base_url=daemon.url, timeout=10) as http:
        return http.get("/api/status").json()


def wait_idle(daemon: Daemon, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        model = status(daemon)["model"]
        if model and model["slots_busy"] == 0 and model["in_flight"] == 0 and not model["queue"]:
            return model
        assert time.monotonic() < deadline, f"requests still held: {model}"
        time.sleep(0.05)


LONG = {"model": MODEL_A, "prompt": "Go on", "raw": True, "options": {"num_predict": 100000}}


def test_a_client_that_leaves_a_stream_is_cancelled(target: Daemon) -> None:
    with httpx.Client(base_url=target.url, timeout=30) as http:
        with http.stream("POST", "/api/generate", json=LONG) as r:
            assert r.headers["content-type"].startswith("application/x-ndjson")
            line = next(r.iter_lines())
            assert json.loads(line)["done"] is False
    left = time.monotonic()
    wait_idle(target, timeout=5)
    assert time.monotonic() - left < 5


def test_a_non_streaming_client_that_leaves_is_cancelled(target: Daemon) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(target.url + "/api/chat", timeout=1.5, json={
            "model": MODEL_A, "messages": USER, "stream": False,
            "options": {"num_predict": 100000}})
    left = time.monotonic()
    wait_idle(target, timeout=5)
    assert time.monotonic() - left < 5


def test_a_disconnect_storm_leaks_nothing(target: Daemon) -> None:
    def stream_then_leave(i: int) -> None:
        path = "/api/chat" if i % 2 else "/api/generate"
        body = {**LONG, "messages": USER} if i % 2 else LONG
        with httpx.Client(base_url=target.url, timeout=30) as http:
            try:
                with http.stream("POST", path, json=body) as r:
                    for _ in zip(range(i % 4), r.iter_lines(), strict=False):
                        pass
            except httpx.HTTPError:
                pass

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(stream_then_leave, range(16)))
    wait_idle(target, timeout=15)


def test_a_burst_past_the_queue_gets_503_in_ollamas_shape(target: Daemon) -> None:
    body = generate(raw=True, options={"num_predict": 24})

    def post(_: int) -> httpx.Response:
        return httpx.post(target.url + "/api/generate", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(post, range(10)))
    codes = {r.status_code for r in answers}
    assert codes <= {200, 503} and codes == {200, 503}, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert isinstance(busy.json()["error"], str) and busy.headers["retry-after"]
    wait_idle(target)


def test_the_daemon_is_healthy_and_never_answered_500(target: Daemon) -> None:
    """Runs last in this module (pytest keeps file order): the whole suite's verdict."""
    with httpx.Client(base_url=target.url, timeout=10) as http:
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics").text
    errors = [line for line in metrics.splitlines()
              if line.startswith("appliance_requests_total") and 'status="5' in line
              and 'status="501"' not in line and 'status="503"' not in line]
    assert not errors, errors
    assert target.process.poll() is None
