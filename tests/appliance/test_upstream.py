"""Upstream routing with real servers: our daemon in front of other `appliance serve` processes
(one with an API key, one we stop and restart), a misbehaving HTTP server for what a real one
never does, and llama.cpp's own llama-server where it is built.

The front daemon holds MODEL_B only; the `team` upstream (key file 0600) serves MODEL_A and
MODEL_B, so MODEL_A is routed and MODEL_B shows that a local model wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import ollama
import openai
import psutil
import pytest

from appliance.client import DaemonClient
from appliance.tray.menu import menu_spec
from appliance.tray.snapshot import from_api
from tests.appliance.conftest import FOREVER, Daemon, free_port, run_daemon
from tests.conftest import MODEL_A, MODEL_B, REPO

T = TypeVar("T")
TEAM_KEY = "team-key-" + secrets.token_hex(12)
FRONT_KEY = "front-key-" + secrets.token_hex(12)
ROGUE_KEY = "rogue-key-" + secrets.token_hex(12)
SPARE_MODEL = "spare-model"
ROGUE_MODELS = ["rogue-big", "rogue-hang", "rogue-text", "rogue-redirect", "rogue-echo",
                "rogue-401", "rogue-stall"]
CPP_MODEL = "cpp-tiny"


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 20) -> T:
    """`check()`'s first truthy answer, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def key_file(folder: Path, name: str, key: str, mode: int = 0o600) -> Path:
    path = folder / name
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


# -- a misbehaving upstream: what a broken or hostile server does -------------------------------


@dataclass
class Rogue:
    server: ThreadingHTTPServer
    seen: list[dict[str, str]] = field(default_factory=list)  # headers of each request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def start_rogue() -> Rogue:
    rogue: Rogue

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json",
                  **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.startswith("/flood/"):  # a listing larger than we read
                self._send(200, b'{"data": [' + b'{"id": "x"},' * 500_000 + b'{"id": "y"}]}')
                return
            if self.path.startswith("/junk/"):  # ids of every wrong kind, and one good one
                data = [{"id": 7}, {"id": ""}, {"id": "a\nb"}, {"id": "z" * 300}, "bare",
                        {"no": "id"}, {"id": "junk-good"}]
            else:
                data = [{"id": m, "object": "model"} for m in ROGUE_MODELS]
            self._send(200, json.dumps({"object": "list", "data": data}).encode())

        def do_POST(self) -> None:
            rogue.seen.append(dict(self.headers.items()))
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            model = body.get("model")
            if model == "rogue-big":  # an answer larger than max_response_bytes
                self._send(200, b'{"x": "' + b"a" * 200_000 + b'"}')
            elif model == "rogue-hang":  # never answers within timeout_s
                time.sleep(6)
                self._send(200, b"{}")
            elif model == "rogue-text":
                self._send(500, b"kaput: the GPU fell over", "text/plain")
            elif model == "rogue-redirect":
                self._send(302, b"", Location="http://attacker.example/v1/chat/completions")
            elif model == "rogue-echo":  # echoes what it was sent, our key included
                message = f"bad request; you sent {dict(self.headers.items())}"
                self._send(400, json.dumps({"error": {"message": message, "type": "x",
                                                      "param": None, "code": None}}).encode())
            elif model == "rogue-401":
                self._send(401, b'{"error": {"message": "no", "type": "auth"}}')
            elif model == "rogue-stall":  # starts a stream, then goes silent
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(6)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    rogue = Rogue(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return rogue


# -- the servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def team(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("team")
    with run_daemon(models_dir, tmp, api_key_file=str(key_file(tmp, "key", TEAM_KEY)),
                    default_model=MODEL_A, parallel="2") as d:
        yield d


@dataclass
class Spare:
    """An upstream without a key that a test stops and starts again on the same port."""

    port: int
    models_dir: Path
    tmp: Path
    running: contextlib.ExitStack | None = None

    def start(self) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(run_daemon(self.models_dir, self.tmp, port=self.port, parallel="1",
                                       aliases=json.dumps({SPARE_MODEL: MODEL_A})))
        self.running = stack

    def stop(self) -> None:
        if self.running is not None:
            self.running.close()
            self.running = None


def llama_server_binary() -> Path | None:
    """llama.cpp's server where bench/build_llama_server.sh puts it for the installed
    llama-cpp-python (never built here: that takes a quarter of an hour);
    $APPLIANCE_LLAMA_SERVER names another."""
    named = os.environ.get("APPLIANCE_LLAMA_SERVER")
    if named:
        binary = Path(named)
    else:
        import llama_cpp

        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        binary = (cache / "qwen-appliance" / f"llama-server-{llama_cpp.__version__}-rpc" / "src"
                  / "vendor" / "llama.cpp" / "build" / "bin" / "llama-server")
    return binary if os.access(binary, os.X_OK) else None


@pytest.fixture(scope="module")
def cpp(models_dir: Path) -> Iterator[str | None]:
    """llama-server on MODEL_A with a key, or None with the reason kept for the skip."""
    binary = llama_server_binary()
    if binary is None:
        yield None
        return
    port = free_port()
    process = subprocess.Popen(
        [str(binary), "-m", str(models_dir / f"{MODEL_A}.gguf"), "--port", str(port),
         "--host", "127.0.0.1", "--alias", CPP_MODEL, "--api-key", TEAM_KEY, "-c", "2048",
         "-t", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), "llama-server", timeout=60)
        yield url + "/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Front:
    daemon: Daemon
    rogue: Rogue
    spare: Spare
    config: Path

    def openai(self, key: str = FRONT_KEY, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.daemon.base_url, api_key=key, max_retries=0,
                             timeout=60, **kwargs)

    def metrics(self) -> str:
        with self.daemon.http() as http:
            return http.get("/metrics").text

    def proxied(self, upstream: str) -> float:
        """How many requests went to `upstream`, by the front's own metrics."""
        pattern = rf'appliance_upstream_requests_total{{status="\d+",upstream="{upstream}"}} ' \
                  r"([0-9.e+]+)"
        return sum(float(v) for v in re.findall(pattern, self.metrics()))


@pytest.fixture(scope="module")
def front(models_dir: Path, team: Daemon, cpp: str | None,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("front")
    own = tmp / "models"
    own.mkdir()
    os.link(models_dir / f"{MODEL_B}.gguf", own / f"{MODEL_B}.gguf")
    spare = Spare(free_port(), models_dir, tmp_path_factory.mktemp("spare"))
    rogue = start_rogue()
    config = tmp / "config.toml"
    text = (f'[upstreams.team]\nurl = "{team.base_url}"\n'
            f'api_key_file = "{key_file(tmp, "team.key", TEAM_KEY)}"\ntimeout_s = 60\n'
            f'[upstreams.spare]\nurl = "http://127.0.0.1:{spare.port}/v1"\n'
            f'models = ["{SPARE_MODEL}"]\n'
            f'[upstreams.rogue]\nurl = "{rogue.url}"\nmodels = {json.dumps(ROGUE_MODELS)}\n'
            f'api_key_file = "{key_file(tmp, "rogue.key", ROGUE_KEY)}"\n'
            "timeout_s = 2\nmax_response_bytes = 65536\n"
            f'[upstreams.junk]\nurl = "{rogue.url.removesuffix("/v1")}/junk/v1"\n'
            f'[upstreams.flood]\nurl = "{rogue.url.removesuffix("/v1")}/flood/v1"\n')
    if cpp:
        text += (f'[upstreams.cpp]\nurl = "{cpp}"\nmodels = ["{CPP_MODEL}"]\n'
                 f'api_key_file = "{tmp / "team.key"}"\n')
    config.write_text(text)
    spare.start()
    try:
        with run_daemon(own, tmp, config=str(config),
                        api_key_file=str(key_file(tmp, "front.key", FRONT_KEY))) as d:
            f = Front(d, rogue, spare, config)
            wait_for(lambda: _listed(f, MODEL_A), "the team upstream's listing")
            yield f
    finally:
        spare.stop()
        rogue.server.shutdown()


def _listed(front: Front, model: str) -> bool:
    with front.openai() as client:
        return model in {m.id for m in client.models.list()}


def _status(daemon: Daemon, key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key or daemon.api_key}"} if key or daemon.api_key \
        else {}
    return httpx.get(daemon.url + "/api/status", headers=headers, timeout=10).json()


def _upstream_idle(team: Daemon) -> bool:
    model = _status(team)["model"]
    return bool(model) and model["slots_busy"] == 0 and model["in_flight"] == 0 \
        and not model["queue"]


# -- routing ------------------------------------------------------------------------------------


def test_models_are_merged_and_a_local_id_wins(front: Front) -> None:
    with front.openai() as client:
        models = {m.id: m for m in client.models.list()}
        assert models[MODEL_A].owned_by == "upstream:team"
        assert models[MODEL_A].model_extra["upstream"] == "team"
        assert models[MODEL_B].owned_by == "qwen-appliance"  # local, though team lists it too
        assert models[SPARE_MODEL].owned_by == "upstream:spare"  # configured: listed while down
        assert models["rogue-big"].owned_by == "upstream:rogue"
        assert client.models.retrieve(MODEL_A).owned_by == "upstream:team"
        before = front.proxied("team")
        answer = client.chat.completions.create(
            model=MODEL_B, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert answer.model == MODEL_B
        assert front.proxied("team") == before  # served here, not upstream
    with front.daemon.http() as http:
        assert http.get("/api/status").json()["model"]["id"] == MODEL_B


def test_chat_routed_not_streamed_is_the_upstreams_answer(front: Front, team: Daemon) -> None:
    ask = {"model": MODEL_A, "messages": [{"role": "user", "content": "Say something"}],
           "max_tokens": 12, "temperature": 0, "seed": 7}
    before = front.proxied("team")
    with front.openai() as client, openai.OpenAI(base_url=team.base_url, api_key=TEAM_KEY,
                                                 max_retries=0, timeout=60) as direct:
        via = client.chat.completions.create(**ask)
        straight = direct.chat.completions.create(**ask)
    assert via.model == MODEL_A and via.usage is not None
    assert via.usage.completion_tokens == straight.usage.completion_tokens == 12
    assert via.choices[0].message.content == straight.choices[0].message.content
    assert front.proxied("team") == before + 1


def test_chat_routed_streamed_with_usage(front: Front, team: Daemon) -> None:
    ask = {"model": MODEL_A, "messages": [{"role": "user", "content": "Count"}],
           "max_tokens": 16, "temperature": 0, "seed": 7,
           "stream_options": {"include_usage": True}}
    with front.openai() as client, openai.OpenAI(base_url=team.base_url, api_key=TEAM_KEY,
                                                 max_retries=0, timeout=60) as direct:
        via = list(client.chat.completions.create(stream=True, **ask))
        straight = list(direct.chat.completions.create(stream=True, **ask))

    def text(chunks: list[Any]) -> str:
        return "".join((c.choices[0].delta.content or "") + (
            getattr(c.choices[0].delta, "reasoning_content", None) or "")
            for c in chunks if c.choices)

    assert len(via) > 3 and text(via) == text(straight) and text(via)
    assert via[-1].usage is not None and via[-1].usage.completion_tokens == 16
    # No log line per proxied request (httpx's INFO line was a stderr write on the way to the
    # first chunk); the front's own access log is debug-only as well.
    assert "HTTP Request:" not in front.daemon.log()


def _connections_to(daemon: Daemon, port: int) -> set[int]:
    """Local ports of `daemon`'s open TCP connections to 127.0.0.1:`port`."""
    return {c.laddr.port for c in psutil.Process(daemon.process.pid).net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


def test_a_routed_request_after_a_pause_reuses_the_upstream_connection(
        front: Front, team: Daemon) -> None:
    """A chat pauses between turns; its next request should not open a new connection to the
    upstream (a connect on both sides, on the way to the first token)."""
    team_port = int(team.url.rsplit(":", 1)[1])
    ask = {"model": MODEL_A, "prompt": "Once", "max_tokens": 1}
    with front.daemon.http() as http:
        assert http.post("/v1/completions", json=ask).status_code == 200
        before = _connections_to(front.daemon, team_port)
        assert before
        # The pause is the subject: longer than the 5 s after which uvicorn closed an idle
        # connection, and than the 4 s after which the front's pool dropped one.
        time.sleep(6)
        assert _connections_to(front.daemon, team_port) == before
        assert http.post("/v1/completions", json=ask).status_code == 200
        assert _connections_to(front.daemon, team_port) == before


def test_completions_and_embeddings_are_routed(front: Front) -> None:
    with front.openai() as client:
        answer = client.completions.create(model=MODEL_A, prompt="Once", max_tokens=4)
        assert answer.model == MODEL_A and answer.usage.completion_tokens == 4
        before = front.proxied("team")
        # MODEL_A is a chat model: the upstream's own refusal comes back, status and words.
        with pytest.raises(openai.BadRequestError, match="embedding") as refused:
            client.embeddings.create(model=MODEL_A, input="x")
        assert refused.value.status_code == 400
        assert front.proxied("team") == before + 1


def test_upstream_errors_keep_status_and_message(front: Front) -> None:
    with front.openai() as client:
        with pytest.raises(openai.BadRequestError, match="outside the vocabulary") as e:
            client.chat.completions.create(model=MODEL_A, messages=[{"role": "user",
                                                                     "content": "x"}],
                                           logit_bias={"999999999": 1}, max_tokens=1)
        assert e.value.body["param"] == "logit_bias"
        # A body that is not OpenAI-shaped is wrapped in that shape, status kept.
        with pytest.raises(openai.InternalServerError, match="kaput") as e:
            client.chat.completions.create(model="rogue-text",
                                           messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 500 and "upstream rogue" in e.value.message


# -- cancellation ------------------------------------------------------------------------------


def test_a_client_that_leaves_a_stream_cancels_the_upstream_request(front: Front,
                                                                   team: Daemon) -> None:
    wait_for(lambda: _upstream_idle(team), "the upstream to be idle")
    body = {"model": MODEL_A, "prompt": "Go on forever", "max_tokens": 100000, "stream": True,
            **FOREVER}
    with front.daemon.http() as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(5):
                next(lines)
            assert _status(team)["model"]["slots_busy"] == 1
    # Left alone it would run to the 4,096-token context, about ten seconds here.
    wait_for(lambda: _upstream_idle(team), "the upstream to cancel", timeout=3)


def test_a_client_that_leaves_a_whole_answer_cancels_the_upstream_request(
        front: Front, team: Daemon) -> None:
    wait_for(lambda: _upstream_idle(team), "the upstream to be idle")
    body = {"model": MODEL_A, "prompt": "Go on forever", "max_tokens": 100000, **FOREVER}
    done = threading.Event()

    def ask() -> None:
        with front.daemon.http() as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
        done.set()

    worker = threading.Thread(target=ask)
    worker.start()
    wait_for(lambda: _status(team)["model"]["slots_busy"] == 1, "the upstream to start")
    wait_for(done.is_set, "the client to give up", timeout=10)
    worker.join()
    wait_for(lambda: _upstream_idle(team), "the upstream to cancel", timeout=3)


# -- security -----------------------------------------------------------------------------------


def test_our_key_checks_come_before_proxying(front: Front) -> None:
    before = front.proxied("team")
    ask = {"model": MODEL_A, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for key in ("wrong", TEAM_KEY):  # the upstream's key is no key here
        with front.openai(key=key) as client, pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(**ask)
    with front.daemon.http() as http:
        too_big = http.post("/v1/chat/completions", content=b"{" + b" " * 5_000_000 + b"}",
                            headers={"Content-Type": "application/json"})
        assert too_big.status_code == 413
        form = http.post("/v1/chat/completions", content=json.dumps(ask),
                         headers={"Content-Type": "text/plain"})
        assert form.status_code == 415
        page = http.post("/v1/chat/completions", json=ask,
                         headers={"Origin": "http://evil.example"})
        assert page.status_code == 403
        invalid = http.post("/v1/chat/completions", json={**ask, "max_tokens": -1})
        assert invalid.status_code == 400
    assert front.proxied("team") == before


def test_keys_never_cross(front: Front, team: Daemon) -> None:
    """The upstream's key reaches neither our clients nor anything we show; the client's key
    never goes upstream (only the upstream's own key and our own headers do)."""
    ask = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    bodies = []
    with front.daemon.http() as http:
        for model in (MODEL_A, "rogue-echo", "rogue-401", "rogue-redirect"):
            r = http.post("/v1/chat/completions", json={**ask, "model": model})
            bodies.append(r.text + str(r.headers))
        with http.stream("POST", "/v1/chat/completions",
                         json={**ask, "model": MODEL_A, "stream": True}) as r:
            bodies.append(r.read().decode() + str(r.headers))
        for path in ("/v1/models", "/api/status", "/metrics", "/api/models"):
            bodies.append(http.get(path).text)
    for text in bodies:
        assert TEAM_KEY not in text and ROGUE_KEY not in text
    assert "[upstream key removed]" in bodies[1]  # rogue-echo quoted our request's headers
    assert front.rogue.seen, "the rogue upstream was never called"
    for headers in front.rogue.seen:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert lowered["authorization"] == f"Bearer {ROGUE_KEY}"
        assert FRONT_KEY not in json.dumps(headers)
        assert "x-api-key" not in lowered and "cookie" not in lowered


def test_misbehaving_upstreams_are_bounded(front: Front) -> None:
    ask = {"messages": [{"role": "user", "content": "x"}]}
    with front.daemon.http() as http:
        big = http.post("/v1/chat/completions", json={**ask, "model": "rogue-big"})
        assert big.status_code == 502 and "max_response_bytes" in big.json()["error"]["message"]
        started = time.monotonic()
        hang = http.post("/v1/chat/completions", json={**ask, "model": "rogue-hang"})
        assert hang.status_code == 504 and "timeout_s" in hang.json()["error"]["message"]
        assert time.monotonic() - started < 5  # timeout_s = 2
        redirect = http.post("/v1/chat/completions", json={**ask, "model": "rogue-redirect"})
        assert redirect.status_code == 502 and "redirect" in redirect.json()["error"]["message"]
        refused = http.post("/v1/chat/completions", json={**ask, "model": "rogue-401"})
        assert refused.status_code == 502
        assert "upstreams.rogue.api_key_file" in refused.json()["error"]["message"]
        with http.stream("POST", "/v1/chat/completions",
                         json={**ask, "model": "rogue-stall", "stream": True}) as r:
            text = r.read().decode()
        assert text.startswith("data: ") and '"hi"' in text
        assert "broke off the stream" in text and text.rstrip().endswith("data: [DONE]")
    metrics = front.metrics()
    assert re.search(r'appliance_upstream_errors_total{kind="upstream_timeout",'
                     r'upstream="rogue"} [1-9]', metrics)


def test_upstream_down_is_503_then_recovers(front: Front) -> None:
    ask = {"model": SPARE_MODEL, "messages": [{"role": "user", "content": "x"}],
           "max_tokens": 2}

    def spare_up() -> bool | None:
        return {u["name"]: u for u in _status(front.daemon)["upstreams"]}["spare"]["up"]

    with front.daemon.http() as http:
        assert http.post("/v1/chat/completions", json=ask).status_code == 200
        front.spare.stop()
        down = http.post("/v1/chat/completions", json=ask)
        assert down.status_code == 503 and int(down.headers["Retry-After"]) > 0
        error = down.json()["error"]
        assert error["code"] == "upstream_unavailable"
        assert "upstream spare" in error["message"] and "unreachable" in error["message"]
        assert spare_up() is False
        front.spare.start()
        assert http.post("/v1/chat/completions", json=ask).status_code == 200
    wait_for(spare_up, "the spare upstream's check to see it back", timeout=15)


# -- the other dialects, status, metrics and the tray -------------------------------------------


def test_status_metrics_and_tray_show_upstreams(front: Front) -> None:
    with front.openai() as client:
        client.chat.completions.create(model=MODEL_A, max_tokens=1,
                                       messages=[{"role": "user", "content": "x"}])
    status = DaemonClient(front.daemon.url, FRONT_KEY).status()
    upstreams = {u["name"]: u for u in status["upstreams"]}
    team = upstreams["team"]
    assert team["up"] is True and team["models"] >= 2 and team["latency_ms"] > 0
    assert time.time() - team["last_check"] < 60 and team["error"] is None
    assert upstreams["rogue"]["models"] == len(ROGUE_MODELS)
    metrics = front.metrics()
    assert re.search(r'appliance_upstream_requests_total{status="200",upstream="team"} [1-9]',
                     metrics)
    assert re.search(r'appliance_upstream_latency_seconds_count{upstream="team"} [1-9]',
                     metrics)
    assert 'appliance_upstream_up{upstream="team"} 1.0' in metrics
    labels = [item.label for item in menu_spec(from_api(status, None))]
    assert any(re.fullmatch(r"Upstream team: up, \d+ models, \d+ ms", label)
               for label in labels), labels


def test_hostile_listings_are_bounded(front: Front) -> None:
    def checked(name: str) -> dict[str, Any] | None:
        found = {u["name"]: u for u in _status(front.daemon)["upstreams"]}[name]
        return found if found["up"] is not None else None

    junk = wait_for(lambda: checked("junk"), "the junk upstream's check")
    assert junk["up"] is True and junk["models"] == 1
    flood = wait_for(lambda: checked("flood"), "the flood upstream's check")
    assert flood["up"] is False and "byte limit" in flood["error"]
    with front.openai() as client:
        ours = {m.id: m.owned_by for m in client.models.list() if m.owned_by in
                ("upstream:junk", "upstream:flood")}
    assert ours == {"junk-good": "upstream:junk"}


def test_llama_server_as_an_upstream(front: Front, cpp: str | None) -> None:
    if cpp is None:
        pytest.skip("llama-server is not built for this llama-cpp-python "
                    "(bench/build_llama_server.sh builds it)")
    with front.openai() as client:
        answer = client.chat.completions.create(
            model=CPP_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert answer.usage.completion_tokens == 4
        chunks = list(client.chat.completions.create(
            model=CPP_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_llama_server_through_ollama_and_anthropic(front: Front, cpp: str | None) -> None:
    """The translation layer against llama.cpp's own OpenAI server, not just ours."""
    if cpp is None:
        pytest.skip("llama-server is not built for this llama-cpp-python "
                    "(bench/build_llama_server.sh builds it)")
    client = ollama.Client(host=front.daemon.url, timeout=60,
                           headers={"Authorization": f"Bearer {FRONT_KEY}"})
    parts = list(client.chat(model=CPP_MODEL, messages=[{"role": "user", "content": "hi"}],
                             options={"num_predict": 4, "temperature": 0}, stream=True))
    assert parts[-1].done and 1 <= (parts[-1].eval_count or 0) <= 4
    assert parts[-1].prompt_eval_count and parts[-1].prompt_eval_count > 0
    with anthropic.Anthropic(base_url=front.daemon.url, api_key=FRONT_KEY,
                             max_retries=0) as claude:
        with claude.messages.stream(model=CPP_MODEL, max_tokens=4,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            final = stream.get_final_message()
    assert final.stop_reason in ("max_tokens", "end_turn")
    assert 1 <= final.usage.output_tokens <= 4 and final.usage.input_tokens > 0


def test_a_world_readable_upstream_key_is_refused(tmp_path: Path) -> None:
    loose = key_file(tmp_path, "loose.key", "k", mode=0o644)
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams.team]\nurl = "http://127.0.0.1:9/v1"\n'
                      f'api_key_file = "{loose}"\n')
    env = {**os.environ, "APPLIANCE_CONFIG": str(config), "APPLIANCE_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "serve"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert done.returncode == 78, done.stderr
    assert "upstreams.team.api_key_file" in done.stderr and "chmod 600" in done.stderr
