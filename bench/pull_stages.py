"""Where a pull's time goes: each stage of `appliance pull` of a big GGUF from the local test hub
timed on its own, in one run, beside curl fetching the same file from the same server.

Stages: the hub metadata call (huggingface-hub's model_info, the first one with its imports),
receiving the body alone (http.client read1 + copy, and readinto1 into a reused buffer), sha256
alone (from memory), writing alone (page cache, no fsync), the fsync of the written file alone
(with and without writeback started every 64 MiB), the whole in-process pull split at its
progress events, and the `appliance pull` command end to end (process start-up included).

    python bench/pull_stages.py [--size-mb 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.library.sink import CHUNK, WRITEBACK, start_writeback  # noqa: E402
from bench.pull_speed import make_gguf, start_hub  # noqa: E402

MB = 1e6


def _get(url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=60)
    connection.request("GET", parts.path, headers={"Accept-Encoding": "identity"})
    return connection, connection.getresponse()


def receive_read1(url: str) -> int:
    """What the pull did: read1 (a new bytes object each call) copied into a reused buffer."""
    connection, response = _get(url)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = n = 0
    while data := response.read1(CHUNK - n):
        view[n:n + len(data)] = data
        n += len(data)
        total += len(data)
        if n == CHUNK:
            n = 0
    connection.close()
    return total


def receive_readinto1(url: str) -> int:
    """One system call per read, straight into the reused buffer: no allocation, no copy."""
    connection, response = _get(url)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    left = response.length or 0
    n = total = 0
    while left:
        got = response.fp.readinto1(view[n:n + min(CHUNK - n, left)])
        if not got:
            break
        n, total, left = n + got, total + got, left - got
        if n == CHUNK:
            n = 0
    connection.close()
    return total


def hash_alone(size: int) -> int:
    buffer = bytearray(os.urandom(CHUNK))
    sha = hashlib.sha256()
    done = 0
    while done < size:
        n = min(CHUNK, size - done)
        sha.update(memoryview(buffer)[:n])
        done += n
    return done


def write_alone(path: Path, size: int, writeback: bool) -> tuple[float, float]:
    """Seconds to write `size` bytes (page cache), then seconds of the fsync after it."""
    buffer = bytearray(os.urandom(CHUNK))
    writeback_from = start_writeback()
    started = time.perf_counter()
    with path.open("wb") as out:
        fd = out.fileno()
        done = synced = 0
        while done < size:
            n = min(CHUNK, size - done)
            out.write(memoryview(buffer)[:n])
            done += n
            if writeback and done - synced >= WRITEBACK:
                writeback_from(fd, synced, done - synced)
                synced = done
        out.flush()
        wrote = time.perf_counter() - started
        started = time.perf_counter()
        os.fsync(fd)
        synced_s = time.perf_counter() - started
    path.unlink()
    return wrote, synced_s


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def pull_phases(endpoint: str, models: Path) -> dict[str, float]:
    """One in-process pull, split where its request goes out, where the answer's headers are
    in, at its last byte, and at its end: plan (hub metadata), start, body, then the checks
    after the last byte (drain, fsync, header, rename, manifest)."""
    from appliance.library import download as download_module
    from appliance.library.hub import Hub
    from appliance.library.pull import Library

    marks: dict[str, float] = {}
    fsyncs: list[float] = []
    real_fsync = os.fsync
    real_stream = download_module._stream

    @contextlib.contextmanager
    def marked_stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
        marks.setdefault("request", time.perf_counter())
        with real_stream(*args, **kwargs) as answer:
            marks.setdefault("response", time.perf_counter())
            yield answer

    def counted_fsync(fd: int) -> None:
        started = time.perf_counter()
        real_fsync(fd)
        fsyncs.append(time.perf_counter() - started)

    def report(event: object) -> None:
        now = time.perf_counter()
        stage, completed, total = (getattr(event, k, None) for k in ("stage", "completed",
                                                                     "total"))
        if stage == "download" and completed and completed == total:
            marks.setdefault("last_byte", now)
        if stage == "verify":
            marks.setdefault("verify", now)

    library = Library(models, hub=Hub(endpoint, token=False))
    started = time.perf_counter()
    plan = library.plan("bench/Big-GGUF")
    planned = time.perf_counter()
    download_module.os.fsync = counted_fsync  # the same os module: pull.py's fsyncs count too
    download_module._stream = marked_stream  # type: ignore[assignment]
    try:
        library.pull(plan, report)
    finally:
        download_module.os.fsync = real_fsync
        download_module._stream = real_stream
    done = time.perf_counter()
    return {"plan_s": planned - started, "to_request_s": marks["request"] - planned,
            "to_response_s": marks["response"] - planned,
            "body_s": marks["last_byte"] - marks["response"],
            "after_last_byte_s": done - marks["last_byte"],
            "fsync_s": sum(fsyncs), "total_s": done - planned}


def cli_pull(endpoint: str, models: Path) -> float:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": "",
           "APPLIANCE_CONFIG": str(models / "absent.toml"), "APPLIANCE_GPU": "none"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "appliance.cli", "pull", "bench/Big-GGUF",
                    "--models-dir", str(models)], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/pull_stages.json")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        source = work / "Big-F32.gguf"
        make_gguf(source, args.size_mb)
        size = source.stat().st_size
        with start_hub(source) as endpoint:
            url = f"{endpoint}/bench/Big-GGUF/resolve/main/Big-F32.gguf"
            target = work / "curl.out"
            for run in range(args.runs):
                add("curl_to_file_s", timed(lambda: subprocess.run(
                    ["curl", "-sf", "-o", str(target), url], check=True)))
                target.unlink()
                add("curl_to_null_s", timed(lambda: subprocess.run(
                    ["curl", "-sf", "-o", os.devnull, url], check=True)))
                add("receive_read1_s", timed(lambda: receive_read1(url)))
                add("receive_readinto1_s", timed(lambda: receive_readinto1(url)))
                add("sha256_s", timed(lambda: hash_alone(size)))
                wrote, synced = write_alone(work / "write.out", size, writeback=False)
                add("write_s", wrote)
                add("fsync_after_plain_write_s", synced)
                wrote, synced = write_alone(work / "write.out", size, writeback=True)
                add("write_with_writeback_s", wrote)
                add("fsync_after_writeback_s", synced)
                models = work / f"models-{run}"
                models.mkdir()
                for key, value in pull_phases(endpoint, models).items():
                    add(f"pull_{key}", value)
                shutil.rmtree(models)
                models.mkdir()
                add("cli_pull_s", cli_pull(endpoint, models))
                shutil.rmtree(models)
                print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()),
                      flush=True)
    median = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    rates = {k.removesuffix("_s") + "_mb_per_s": round(size / v / MB, 1)
             for k, v in median.items()
             if k in ("curl_to_file_s", "curl_to_null_s", "receive_read1_s",
                      "receive_readinto1_s", "sha256_s", "write_s", "pull_body_s",
                      "pull_total_s", "cli_pull_s")}
    result = {"bytes": size, "runs": args.runs, "median_s": median, "median_rates": rates,
              "all_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
              "load_average": os.getloadavg()[0]}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median_s": median, "median_rates": rates}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
