"""The Ollama API through the official `ollama` client, against a real daemon."""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import ollama
import pytest

from appliance.api.routes.ollama import ERROR_PREFIXES
from appliance.engine.output import ChatOutputParser
from tests.appliance.conftest import Daemon, free_port, run_daemon
from tests.conftest import MODEL_A, MODEL_B

T = TypeVar("T")
GREEDY = {"temperature": 0.0, "seed": 7}
HI = [{"role": "user", "content": "Hi"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def target(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # Its own daemon: these tests load and unload models, which the shared one must not see.
    with run_daemon(models_dir, tmp_path_factory.mktemp("ollama"), default_model=MODEL_A,
                    parallel="4", max_queue="8") as daemon:
        yield daemon


@pytest.fixture()
def client(target: Daemon) -> Iterator[ollama.Client]:
    with ollama.Client(host=target.url, timeout=120) as c:
        yield c


def wait_for(check: Callable[[], T | None], timeout: float = 20, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def running(client: ollama.Client) -> set[str]:
    return {m.model for m in client.ps().models}


# -- server and models ------------------------------------------------------------------------


def test_root_version_and_head(target: Daemon) -> None:
    with target.http() as http:
        root = http.get("/")
        head = http.head("/")
        version = http.get("/api/version").json()["version"]
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert head.status_code == 200 and head.content == b""
    assert tuple(int(p) for p in version.split(".")) >= (0, 9, 0)  # clients gate `think` on it


def test_list_shows_usable_models_with_details(client: ollama.Client,
                                               models_dir: Path) -> None:
    models = {m.model: m for m in client.list().models}
    assert set(models) == {f"{MODEL_A}:latest", f"{MODEL_B}:latest"}  # broken.gguf is not
    a = models[f"{MODEL_A}:latest"]
    assert a.size == (models_dir / f"{MODEL_A}.gguf").stat().st_size
    assert a.details.format == "gguf" and a.details.family == "qwen3"
    assert a.details.quantization_level == "Q4_K_M"
    assert models[f"{MODEL_B}:latest"].details.quantization_level == "Q8_0"
    assert a.details.parameter_size.endswith("M")  # a tiny model: millions of parameters
    age = datetime.datetime.now(datetime.timezone.utc) - a.modified_at
    assert datetime.timedelta(0) <= age < datetime.timedelta(days=1)


def test_digest_is_the_files_sha256_once_computed(client: ollama.Client,
                                                  models_dir: Path) -> None:
    expected = hashlib.sha256((models_dir / f"{MODEL_A}.gguf").read_bytes()).hexdigest()

    def digest() -> str | None:
        found = {m.model: m.digest for m in client.list().models}[f"{MODEL_A}:latest"]
        return found or None  # "" while the background thread hashes

    assert wait_for(digest, what="the digest") == expected


def test_show_reads_the_gguf_header(client: ollama.Client) -> None:
    info = client.show(f"{MODEL_A}:latest")
    assert info.details.family == "qwen3" and info.details.format == "gguf"
    assert info.modelinfo["general.architecture"] == "qwen3"
    assert info.modelinfo["general.parameter_count"] > 1_000_000
    assert "<|im_start|>" in info.template
    assert set(info.capabilities) >= {"completion", "tools", "thinking"}


def test_names_resolve_ollama_style(client: ollama.Client) -> None:
    for name in (MODEL_A, f"{MODEL_A}:latest", "tiny-qwen3:q4_k_m", MODEL_A.upper()):
        r = client.generate(model=name, prompt="x", raw=True, options={"num_predict": 1})
        assert r.model == name and r.done


def test_unknown_model_is_a_404_response_error(client: ollama.Client) -> None:
    for call in (lambda: client.chat(model="nope:7b", messages=HI),
                 lambda: client.generate(model="nope", prompt="x"),
                 lambda: client.show("nope"),
                 # Two models start with tiny-qwen3-: an ambiguous name is not guessed.
                 lambda: client.chat(model="tiny-qwen3", messages=HI)):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404
        assert "not found" in e.value.error and f"{MODEL_A}:latest" in e.value.error


def test_pull_delete_and_embed_say_what_to_do(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as pull:  # Ollama's library names are not hub repos
        client.pull("qwen3:8b")
    assert 400 <= pull.value.status_code < 500 and pull.value.error
    client.generate(model=MODEL_A, prompt="x", options={"num_predict": 1})
    with pytest.raises(ollama.ResponseError) as delete:  # the model library refuses a loaded one
        client.delete(MODEL_A)
    assert delete.value.status_code == 409 and "loaded" in delete.value.error
    with pytest.raises(ollama.ResponseError) as embed:
        client.embed(model=MODEL_A, input="hello")
    assert embed.value.status_code == 400 and "embedding" in embed.value.error
    with pytest.raises(ollama.ResponseError) as legacy:
        client.embeddings(model=MODEL_A, prompt="hello")
    assert legacy.value.status_code == 400


# -- chat and generate ------------------------------------------------------------------------


def test_chat_whole_with_measured_timings(client: ollama.Client) -> None:
    r = client.chat(model=MODEL_A, messages=[{"role": "system", "content": "Be brief."},
                                             *HI], options={"num_predict": 8, **GREEDY})
    assert r.message.role == "assistant" and isinstance(r.message.content, str)
    assert r.done and r.done_reason == "length" and r.eval_count == 8
    assert r.prompt_eval_count > 10
    assert 0 < r.prompt_eval_duration < r.total_duration
    assert 0 < r.eval_duration < r.total_duration
    assert r.prompt_eval_duration + r.eval_duration <= r.total_duration
    assert 0 <= r.load_duration < r.total_duration


def test_chat_stream_matches_whole(client: ollama.Client) -> None:
    options = {"num_predict": 12, **GREEDY}
    whole = client.chat(model=MODEL_A, messages=HI, think=False, options=options)
    parts = list(client.chat(model=MODEL_A, messages=HI, think=False, options=options,
                             stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == 12 and parts[-1].done_reason == "length"
    assert parts[-1].prompt_eval_count == whole.prompt_eval_count


def test_generate_whole_and_stream(client: ollama.Client) -> None:
    options = {"num_predict": 10, **GREEDY}
    whole = client.generate(model=MODEL_A, prompt="The capital of France is", options=options)
    parts = list(client.generate(model=MODEL_A, prompt="The capital of France is",
                                 options=options, stream=True))
    assert whole.done and whole.eval_count == 10
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].done and parts[-1].eval_count == 10


def test_generate_system_and_raw(client: ollama.Client) -> None:
    plain = client.generate(model=MODEL_A, prompt="Hi", options={"num_predict": 1})
    system = client.generate(model=MODEL_A, prompt="Hi", system="You are a pirate.",
                             options={"num_predict": 1})
    raw = client.generate(model=MODEL_A, prompt="Hi", raw=True, options={"num_predict": 1})
    assert system.prompt_eval_count > plain.prompt_eval_count  # the system turn is rendered
    assert raw.prompt_eval_count == 1  # "Hi" alone: no template around it


def test_seed_reproduces_and_differs(client: ollama.Client) -> None:
    def text(seed: int) -> str:
        return client.generate(model=MODEL_A, prompt="Once upon a time", raw=True,
                               options={"seed": seed, "temperature": 1.0,
                                        "num_predict": 12}).response

    first = text(42)
    assert text(42) == first
    assert any(text(seed) != first for seed in (1, 2, 3))


def test_stop_and_num_predict(client: ollama.Client) -> None:
    full = client.generate(model=MODEL_A, prompt="Hello", raw=True,
                           options={"num_predict": 20, **GREEDY}).response
    stop = full[5:8]
    assert stop
    cut = client.generate(model=MODEL_A, prompt="Hello", raw=True,
                          options={"num_predict": 20, "stop": [stop], **GREEDY})
    assert cut.response == full[:full.index(stop)] and cut.done_reason == "stop"


def test_num_ctx_narrows_but_never_widens(client: ollama.Client) -> None:
    small = client.generate(model=MODEL_A, prompt="Hello", raw=True,
                            options={"num_ctx": 6, "num_predict": -1})
    assert small.prompt_eval_count + small.eval_count <= 6 and small.done_reason == "length"
    with pytest.raises(ollama.ResponseError) as wide:
        client.generate(model=MODEL_A, prompt="Hello", options={"num_ctx": 1_000_000})
    assert wide.value.status_code == 400
    assert "num_ctx" in wide.value.error and "4096" in wide.value.error
    with pytest.raises(ollama.ResponseError) as overflow:
        client.generate(model=MODEL_A, prompt="word " * 50, options={"num_ctx": 16})
    assert overflow.value.status_code == 400 and "num_ctx" in overflow.value.error


def test_format_schema_and_json(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "confident": {"type": "boolean"}}, "required": ["answer", "confident"],
        "additionalProperties": False}
    r = client.chat(model=MODEL_A, messages=[{"role": "user", "content": "Is water wet?"}],
                    format=schema, options={"num_predict": 200, "temperature": 0.7, "seed": 3})
    data = json.loads(r.message.content)
    assert data["answer"] in ("yes", "no") and isinstance(data["confident"], bool)
    assert not r.message.thinking  # a grammar shapes the answer from its first token
    g = client.generate(model=MODEL_A, prompt="JSON please", format=schema,
                        options={"num_predict": 200, "seed": 5})
    assert set(json.loads(g.response)) == {"answer", "confident"}


def test_think_reaches_the_template(client: ollama.Client) -> None:
    on = client.chat(model=MODEL_A, messages=HI, think=True, options={"num_predict": 1})
    off = client.chat(model=MODEL_A, messages=HI, think=False, options={"num_predict": 1})
    # "<think>\n\n</think>\n\n" closes thinking in the prompt: 4 more tokens.
    assert off.prompt_eval_count == on.prompt_eval_count + 4
    levels = client.chat(model=MODEL_A, messages=HI, think="high", options={"num_predict": 1})
    assert levels.prompt_eval_count == on.prompt_eval_count


def test_tools_and_tool_turns_reach_the_template(client: ollama.Client) -> None:
    bare = client.chat(model=MODEL_A, messages=HI, options={"num_predict": 1})
    tooled = client.chat(model=MODEL_A, messages=HI, tools=[WEATHER_TOOL],
                         options={"num_predict": 1})
    assert tooled.prompt_eval_count > bare.prompt_eval_count + 20  # the tool's signature
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "thinking": "Call the tool.",
                "tool_calls": [{"function": {"name": "get_weather",
                                             "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    follow = client.chat(model=MODEL_A, messages=history, tools=[WEATHER_TOOL],
                         options={"num_predict": 1})
    assert follow.prompt_eval_count > tooled.prompt_eval_count + 10


def test_tool_calls_and_thinking_come_back_in_ollamas_shape(target: Daemon) -> None:
    """The model's markup, split by the real output parser, in the answer objects the official
    client parses (a random-weight model cannot be made to call a tool on its own)."""
    from appliance.api.routes.ollama import _tool_calls

    parser = ChatOutputParser(prompt="", parse_tools=True)
    delta = parser.feed('<think>\nWeather needs a tool.\n</think>\n\n<tool_call>\n'
                        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    tail, calls = parser.finish()
    tool_calls, leftover = _tool_calls(calls)
    message = ollama.ChatResponse.model_validate({
        "model": MODEL_A, "created_at": "2026-01-01T00:00:00.000000Z", "done": True,
        "message": {"role": "assistant", "content": delta.content + tail.content + leftover,
                    "thinking": delta.reasoning, "tool_calls": tool_calls}}).message
    assert message.thinking == "Weather needs a tool." and message.content == ""
    assert message.tool_calls[0].function.name == "get_weather"
    assert message.tool_calls[0].function.arguments == {"city": "Paris"}


def test_images_are_refused_before_loading(client: ollama.Client) -> None:
    pixel = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGBgAAAABQABpfZFQAAAAABJRU5ErkJggg=="
    with pytest.raises(ollama.ResponseError) as chat:
        client.chat(model=MODEL_A, messages=[{"role": "user", "content": "?", "images": [pixel]}])
    assert chat.value.status_code == 400 and "vision" in chat.value.error
    with pytest.raises(ollama.ResponseError) as generate:
        client.generate(model=MODEL_A, prompt="?", images=[pixel])
    assert generate.value.status_code == 400


def test_template_suffix_and_context_are_refused(client: ollama.Client) -> None:
    for fields in ({"template": "{{ .Prompt }}"}, {"suffix": "end"}, {"context": [1, 2, 3]}):
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model=MODEL_A, prompt="x", **fields)
        assert e.value.status_code == 400 and next(iter(fields)) in e.value.error


def test_concurrent_chats_batch_and_match_solo_runs(client: ollama.Client) -> None:
    prompts = [f"Tell me about {topic}." for topic in ("cats", "the sea", "rust", "tea")]

    def ask(prompt: str) -> tuple[str, int]:
        r = client.chat(model=MODEL_A, messages=[{"role": "user", "content": prompt}],
                        think=False, options={"num_predict": 16, **GREEDY})
        return r.message.content, r.eval_count

    solo = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    assert together == solo


def test_ollama_paths_answer_errors_in_ollamas_shape(target: Daemon) -> None:
    with target.http() as http:
        wrong_method = http.get("/api/chat")
        validation = http.post("/api/chat", json={"model": MODEL_A, "messages": "hi"})
        control = http.post("/api/models/nope/load")  # the control API keeps its own shape
    assert wrong_method.status_code == 405 and isinstance(wrong_method.json()["error"], str)
    assert validation.status_code == 400 and "messages" in validation.json()["error"]
    assert isinstance(control.json()["error"], dict)
    assert "/api/chat" in ERROR_PREFIXES and "/api/status" not in ERROR_PREFIXES


# -- the opt-in second port ---------------------------------------------------------------------


def test_ollama_port_serves_the_same_app(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    with run_daemon(models_dir, tmp_path, ollama_port=str(port)) as daemon:
        with ollama.Client(host=f"http://127.0.0.1:{port}", timeout=60) as second:
            assert f"{MODEL_A}:latest" in {m.model for m in second.list().models}
            r = second.generate(model=MODEL_A, prompt="x", raw=True, options={"num_predict": 1})
            assert r.done
        with daemon.http() as http:  # the main port, with the same resident model
            assert http.get("/api/status").json()["model"]["id"] == MODEL_A
        assert f"also serving on http://127.0.0.1:{port}" in daemon.log()


def test_ollama_port_must_differ_from_port(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    from appliance.config import SettingsError, load_settings

    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "absent.toml"))
    assert load_settings(port=9000, ollama_port=11434).ollama_port == 11434
    with pytest.raises(SettingsError, match="ollama_port"):
        load_settings(port=9000, ollama_port=9000)


def test_ollama_port_in_use_leaves_the_main_port_serving(models_dir: Path,
                                                        tmp_path: Path) -> None:
    with socket.socket() as taken:  # as a running Ollama would hold 11434
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with run_daemon(models_dir, tmp_path, ollama_port=str(port)) as daemon:
            with daemon.http() as http:
                assert http.get("/api/tags").status_code == 200
            assert f"cannot also serve on port {port} (ollama_port)" in daemon.log()


# -- residency: load, unload, keep_alive ------------------------------------------------------


def test_ps_shows_the_resident_model(client: ollama.Client) -> None:
    client.generate(model=MODEL_A, prompt="x", raw=True, options={"num_predict": 1})
    [model] = client.ps().models
    assert model.model == f"{MODEL_A}:latest" and model.details.family == "qwen3"
    assert model.size_vram == 0  # measured: this daemon runs on the CPU
    assert model.size > 0 and model.context_length == 4096
    left = model.expires_at - datetime.datetime.now(datetime.timezone.utc)
    # The default keep_alive_s is 15 minutes.
    assert datetime.timedelta(minutes=14) < left <= datetime.timedelta(minutes=15, seconds=1)


def test_keep_alive_sets_the_timer(client: ollama.Client) -> None:
    client.generate(model=MODEL_A, prompt="x", raw=True, keep_alive="1h",
                    options={"num_predict": 1})
    left = client.ps().models[0].expires_at - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(minutes=59) < left <= datetime.timedelta(hours=1, seconds=1)
    client.generate(model=MODEL_A, prompt="x", raw=True, keep_alive=-1,
                    options={"num_predict": 1})
    forever = client.ps().models[0].expires_at
    assert forever.year > datetime.datetime.now().year + 100
    client.generate(model=MODEL_A, prompt="x", raw=True, keep_alive=2,
                    options={"num_predict": 1})
    wait_for(lambda: not running(client), timeout=15, what="the 2 s keep_alive to expire")


def test_keep_alive_zero_unloads_after_the_request(client: ollama.Client) -> None:
    r = client.chat(model=MODEL_A, messages=HI, keep_alive=0, options={"num_predict": 2})
    assert r.done
    wait_for(lambda: not running(client), what="the model to leave ps")
    # The next request loads it again, and says how long that took.
    again = client.chat(model=MODEL_A, messages=HI, options={"num_predict": 2})
    assert again.load_duration > 10_000_000  # over 10 ms: a real load
    warm = client.chat(model=MODEL_A, messages=HI, options={"num_predict": 2})
    assert warm.load_duration < again.load_duration


def test_empty_requests_load_and_unload(client: ollama.Client) -> None:
    unloaded = client.generate(model=MODEL_A, keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert not running(client)
    loaded = client.chat(model=MODEL_B, messages=[])
    assert loaded.done and loaded.done_reason == "load"
    assert running(client) == {f"{MODEL_B}:latest"}
    assert client.generate(model=MODEL_B, keep_alive=0).done_reason == "unload"
    assert not running(client)


def test_the_daemon_never_answered_500(target: Daemon) -> None:
    """Runs last in this module: 501 (not implemented) is expected, nothing else from 5xx."""
    with httpx.Client(base_url=target.url, timeout=10) as http:
        metrics = http.get("/metrics").text
    errors = [line for line in metrics.splitlines()
              if line.startswith("appliance_requests_total") and 'status="5' in line
              and 'status="501"' not in line and 'status="503"' not in line]
    assert not errors, errors
    assert target.process.poll() is None
