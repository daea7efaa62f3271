"""Soak: many clients with a mix of everything, for minutes, against a real daemon.

    python bench/soak.py MODEL.gguf [--minutes 10] [--clients 8] [--threads 2]

Each client loops over: a streamed chat, a whole chat, a json_schema answer, a forced tool call,
a stream it leaves after a few tokens (one request in five), and a request it abandons before the
answer (a cancelled one). Every response is checked: JSON answers must parse, tool calls must come
back as tool_calls. The daemon's RSS is sampled every 5 s. At the end: RSS growth from minute 2 to
the end, slots and in-flight requests back to zero, and every error other than the intended
disconnects. Prints one JSON object and writes it to bench/results/soak-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "year": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["title", "year", "tags"]}
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 60}},
    "required": ["query"]}}}]
TOPICS = ["the sea", "a lighthouse", "bread", "rain in April", "a red kite", "old maps"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client(threading.Thread):
    def __init__(self, index: int, url: str, model: str, until: float,
                 outcomes: Counter[str], errors: list[str]) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.random = random.Random(index)
        self.url, self.model, self.until = url, model, until
        self.outcomes, self.errors = outcomes, errors
        self.lock = threading.Lock()

    def count(self, outcome: str, error: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if error:
                self.errors.append(f"{outcome}: {error[:300]}")

    def messages(self) -> list[dict[str, str]]:
        topic = self.random.choice(TOPICS)
        return [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Tell me about {topic} ({self.random.random()})."}]

    def body(self, **extra: object) -> dict[str, object]:
        return {"model": self.model, "messages": self.messages(), "max_tokens": 48,
                "temperature": 0.8, "chat_template_kwargs": {"enable_thinking": False},
                **extra}

    def run(self) -> None:
        kinds = ["stream", "whole", "json", "tool", "leave_stream", "abandon"]
        weights = [3, 2, 2, 2, 2, 1]  # one request in five leaves mid-stream
        # Generous: on a shared machine a queued request can wait minutes; a hang still shows.
        with httpx.Client(base_url=self.url, timeout=1200) as http:
            while time.monotonic() < self.until:
                kind = self.random.choices(kinds, weights)[0]
                try:
                    getattr(self, kind)(http)
                except Exception as e:  # every unexpected failure is a finding
                    self.count(f"{kind}_failed", repr(e))

    def stream(self, http: httpx.Client, leave_after: int | None = None) -> None:
        kind = "leave_stream" if leave_after else "stream"
        with http.stream("POST", "/v1/chat/completions",
                         json=self.body(stream=True)) as response:
            if response.status_code != 200:
                self.count(f"{kind}_{response.status_code}", response.read().decode())
                return
            lines = 0
            for line in response.iter_lines():
                if line.startswith("data: {") and '"error"' in line[:20]:
                    self.count(f"{kind}_error_event", line)
                    return
                lines += 1
                if leave_after and lines >= leave_after:
                    self.count("left_mid_stream")
                    return
            self.count(kind)

    def leave_stream(self, http: httpx.Client) -> None:
        self.stream(http, leave_after=self.random.randint(2, 6))

    def whole(self, http: httpx.Client) -> None:
        r = http.post("/v1/chat/completions", json=self.body())
        self.check(r, "whole")

    def json(self, http: httpx.Client) -> None:
        r = http.post("/v1/chat/completions", json=self.body(response_format={
            "type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}},
            max_tokens=96))
        if self.check(r, "json"):
            choice = r.json()["choices"][0]
            if choice["finish_reason"] == "length":
                self.count("json_truncated")
                return
            try:
                data = json.loads(choice["message"]["content"])
                assert set(SCHEMA["required"]) <= set(data)
            except Exception as e:
                self.count("json_invalid", f"{e!r}: {choice['message']['content']!r}")

    def tool(self, http: httpx.Client) -> None:
        r = http.post("/v1/chat/completions", json=self.body(tools=TOOLS, tool_choice="required",
                                                             max_tokens=120))
        if self.check(r, "tool"):
            choice = r.json()["choices"][0]
            if choice["finish_reason"] == "length":
                self.count("tool_truncated")
            elif not choice["message"].get("tool_calls"):
                self.count("tool_missing", json.dumps(choice)[:300])

    def abandon(self, http: httpx.Client) -> None:
        try:
            httpx.post(self.url + "/v1/chat/completions", json=self.body(max_tokens=400),
                       timeout=self.random.uniform(0.3, 1.5))
            self.count("abandon_finished_first")
        except httpx.TimeoutException:
            self.count("abandoned")

    def check(self, r: httpx.Response, kind: str) -> bool:
        if r.status_code != 200:
            self.count(f"{kind}_{r.status_code}", r.text)
            return False
        self.count(kind)
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nice", type=int, default=5, help="the engine's nice value")
    args = parser.parse_args()

    models = Path(tempfile.mkdtemp(prefix="soak-models-"))
    model_id = args.model.stem.lower()
    (models / args.model.name).symlink_to(args.model.resolve())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "APPLIANCE_PORT": str(port), "APPLIANCE_MODELS_DIR": str(models),
           "APPLIANCE_CONFIG": str(models / "absent.toml"), "APPLIANCE_GPU": "none",
           "APPLIANCE_THREADS": str(args.threads), "APPLIANCE_PARALLEL": "4",
           "APPLIANCE_CONTEXT_LENGTH": "1024", "APPLIANCE_MAX_QUEUE": "16",
           "APPLIANCE_DEFAULT_MODEL": model_id, "APPLIANCE_ENGINE_NICE": str(args.nice)}
    log = open(models / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200 and httpx.get(
                        url + "/api/status", timeout=2).json()["state"] == "ready":
                    break
            except httpx.HTTPError:
                pass
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start:\n" + (models / "daemon.log").read_text())
            time.sleep(0.2)
        process = psutil.Process(daemon.pid)
        started = time.monotonic()
        until = started + args.minutes * 60
        outcomes: Counter[str] = Counter()
        errors: list[str] = []
        clients = [Client(i, url, model_id, until, outcomes, errors) for i in range(args.clients)]
        for client in clients:
            client.start()
        samples: list[tuple[float, int]] = []
        while time.monotonic() < until:
            samples.append((time.monotonic() - started, process.memory_info().rss))
            time.sleep(5)
        for client in clients:
            client.join(timeout=600)
        end = time.monotonic()
        while True:  # abandoned requests are cancelled within a step; give them a moment
            model = httpx.get(url + "/api/status", timeout=10).json()["model"]
            if (model["slots_busy"], model["in_flight"], model["queue"]) == (0, 0, 0) \
                    or time.monotonic() - end > 10:
                break
            time.sleep(0.1)
        samples.append((time.monotonic() - started, process.memory_info().rss))
        metrics = httpx.get(url + "/metrics", timeout=10).text
        server_errors = [line for line in metrics.splitlines() if line.startswith(
            "appliance_requests_total") and 'status="5' in line]
        health = httpx.get(url + "/health", timeout=10).status_code
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    after_warmup = [rss for t, rss in samples if t >= min(120, args.minutes * 60 / 5)]
    growth = (after_warmup[-1] - after_warmup[0]) / after_warmup[0] if after_warmup else None
    intended = {"stream", "whole", "json", "tool", "left_mid_stream", "abandoned",
                "abandon_finished_first", "json_truncated", "tool_truncated"}
    result = {
        "model": model_id, "minutes": args.minutes, "clients": args.clients,
        "engine_nice": args.nice, "load_average_at_end": os.getloadavg(),
        "requests": sum(outcomes.values()), "outcomes": dict(sorted(outcomes.items())),
        "unintended": {k: v for k, v in outcomes.items() if k not in intended},
        "errors_sample": errors[:20],
        "rss_mb_at_warmup_end": round(after_warmup[0] / 2**20, 1) if after_warmup else None,
        "rss_mb_at_end": round(samples[-1][1] / 2**20, 1),
        "rss_growth_after_warmup": round(growth, 4) if growth is not None else None,
        "rss_mb_samples": [(round(t), round(rss / 2**20, 1)) for t, rss in samples],
        "end_state": {"slots_busy": model["slots_busy"], "in_flight": model["in_flight"],
                      "queue": model["queue"]},
        "server_error_lines": server_errors, "health_at_end": health,
        "daemon_exit_code": daemon.returncode,
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = REPO / "bench" / "results" / f"soak-{model_id}.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
