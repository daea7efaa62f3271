"""Where a pull's time goes: each stage of `appliance pull` of a big GGUF from the local test hub
timed on its own, in one run, beside curl fetching the same file from the same server.

Stages: curl to a file, to /dev/null, and its own time to first byte; the hub metadata call
(the first one with its imports), receiving the body alone (http.client read1 + copy, and
readinto1 into a reused buffer), sha256 alone (from memory), writing alone (page cache as curl
does, and past it with O_DIRECT) and the fsync after each, the pull's own disk side (sink.py:
write and hash as it goes, no wait for the disk) fed from memory; the whole in-process pull split where its
body starts and ends and where its writer and hasher finish, with each thread's CPU seconds; `appliance pull
--dry-run` (everything before the first body byte) and `appliance pull` end to end; the hub
process's CPU seconds for curl, the in-process pull and the command. A sync (untimed) before
each disk stage, so none pays for another's writeback.

    python bench/pull_stages.py [--size-mb 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import mmap
import os
import platform
import queue
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

from appliance.library.sink import CHUNK, Sink  # noqa: E402
from bench.pull_speed import (  # noqa: E402
    compile_once,
    hub_process,
    make_gguf,
    process_cpu,
    pull_env,
)

MB = 1e6
ALIGN = 4096  # O_DIRECT's unit for offsets, lengths and memory


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


def write_alone(path: Path, size: int) -> tuple[float, float]:
    """Seconds to write `size` bytes into the page cache (curl's way), then seconds of the fsync
    after it."""
    buffer = bytearray(os.urandom(CHUNK))
    started = time.perf_counter()
    with path.open("wb") as out:
        fd = out.fileno()
        done = 0
        while done < size:
            n = min(CHUNK, size - done)
            out.write(memoryview(buffer)[:n])
            done += n
        out.flush()
        wrote = time.perf_counter() - started
        started = time.perf_counter()
        os.fsync(fd)
        synced_s = time.perf_counter() - started
    path.unlink()
    return wrote, synced_s


def sink_alone(path: Path, size: int) -> tuple[float, float]:
    """The pull's own disk side (sink.py: writer and hasher threads) fed from memory: seconds
    until every byte is handed over, then seconds of its finish (the last buffers written and
    hashed)."""
    free: queue.Queue[Any] = queue.Queue()
    for _ in range(4):
        buffer = mmap.mmap(-1, CHUNK)
        buffer[:] = os.urandom(CHUNK)
        free.put(buffer)
    started = time.perf_counter()
    with path.open("a+b") as out:
        sink = Sink(out, 0, free)
        done = 0
        while done < size:
            n = min(CHUNK, size - done)
            sink.put(free.get(), n)
            done += n
        handed = time.perf_counter() - started
        started = time.perf_counter()
        sink.finish()
        finished = time.perf_counter() - started
    path.unlink()
    return handed, finished


def write_direct_alone(path: Path, size: int) -> tuple[float, float]:
    """Seconds to write `size` bytes past the page cache (O_DIRECT, an early pull writer), then
    seconds of the fsync after it; (nan, nan) where the
    filesystem refuses O_DIRECT."""
    buffer = mmap.mmap(-1, CHUNK)
    buffer[:] = os.urandom(CHUNK)
    path.touch()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return float("nan"), float("nan")
    try:
        started = time.perf_counter()
        done = 0
        whole = size // ALIGN * ALIGN
        while done < whole:
            done += os.pwrite(fd, memoryview(buffer)[:min(CHUNK, whole - done)], done)
        wrote = time.perf_counter() - started
        started = time.perf_counter()
        os.fsync(fd)
        return wrote, time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def pull_phases(endpoint: str, models: Path) -> dict[str, float]:
    """One in-process pull, split where its request goes out, where the answer's headers are
    in, at its last byte received, when the writer and hasher are done with it, and at its end:
    plan (hub metadata), start, body, drain, then header check, manifest (fsynced) and rename.
    With the CPU seconds of each thread: the receiver (this one), the writer and the hasher
    (is the hash on the critical path?)."""
    from appliance.library import download as download_module
    from appliance.library import sink as sink_module
    from appliance.library.hub import Hub
    from appliance.library.pull import Library

    marks: dict[str, float] = {}
    fsyncs: list[float] = []
    thread_cpu = {"write": 0.0, "hash": 0.0}
    real_fsync = os.fsync
    real_stream = download_module.stream
    real = {name: getattr(sink_module.Sink, name) for name in ("_write", "_hash", "finish",
                                                               "drain")}

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

    def timed_thread(name: str) -> Callable[[Any], None]:
        def run(sink: Any) -> None:
            real["_" + name](sink)
            thread_cpu[name] += time.thread_time()
        return run

    def finish(sink: Any) -> str:
        marks["received"] = time.perf_counter()
        return real["finish"](sink)

    def drain(sink: Any) -> None:
        real["drain"](sink)
        marks["drained"] = time.perf_counter()

    library = Library(models, hub=Hub(endpoint, token=False))
    started = time.perf_counter()
    plan = library.plan("bench/Big-GGUF")
    planned = time.perf_counter()
    os.fsync = counted_fsync  # one os module: the manifest's fsyncs count
    download_module.stream = marked_stream  # type: ignore[assignment]
    patched = {"_write": timed_thread("write"), "_hash": timed_thread("hash"), "finish": finish,
               "drain": drain}
    for name, fn in patched.items():
        setattr(sink_module.Sink, name, fn)
    receiver_cpu = time.thread_time()
    try:
        library.pull(plan)
    finally:
        receiver_cpu = time.thread_time() - receiver_cpu
        os.fsync = real_fsync
        download_module.stream = real_stream
        for name, fn in real.items():
            setattr(sink_module.Sink, name, fn)
    done = time.perf_counter()
    return {"plan_s": planned - started, "to_request_s": marks["request"] - planned,
            "to_response_s": marks["response"] - planned,
            "body_s": marks["received"] - marks["response"],
            "drain_after_last_byte_s": marks["drained"] - marks["received"],
            "after_last_byte_s": done - marks["received"],
            "fsync_s": sum(fsyncs), "total_s": done - planned,
            "cpu_receiver_s": receiver_cpu, "cpu_writer_s": thread_cpu["write"],
            "cpu_hasher_s": thread_cpu["hash"]}


def cli_pull(endpoint: str, models: Path, *flags: str) -> float:
    """Seconds of `appliance pull` from its start to its exit (`--dry-run`: everything before
    the first body byte: start-up, imports, the metadata call, the fit line). The same settings
    every run (APPLIANCE_CONFIG beside `models`), as a user has: their memo is used."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "appliance.cli", "pull", "bench/Big-GGUF",
                    "--models-dir", str(models), *flags], check=True,
                   env=pull_env(endpoint, models.parent), cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def curl_first_byte(url: str) -> float:
    """curl's own time to its first body byte (its start-up excluded: curl reports it)."""
    out = subprocess.run(["curl", "-sf", "-o", os.devnull, "-r", "0-0", "-w",
                          "%{time_starttransfer}", url], check=True, capture_output=True,
                         text=True).stdout
    return float(out)


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
        with hub_process(source) as (endpoint, hub_pid):
            url = f"{endpoint}/bench/Big-GGUF/resolve/main/Big-F32.gguf"
            target = work / "curl.out"
            compile_once(endpoint, work)

            def hub_cpu_of(name: str, fn: Callable[[], object]) -> Any:
                """fn() with the hub's CPU seconds meanwhile added as hub_cpu_NAME_s."""
                os.sync()  # nothing dirty left by the stage before
                used = process_cpu(hub_pid)
                answer = fn()
                add(f"hub_cpu_{name}_s", process_cpu(hub_pid) - used)
                return answer

            for run in range(args.runs):
                add("curl_to_file_s", hub_cpu_of("curl", lambda: timed(lambda: subprocess.run(
                    ["curl", "-sf", "-o", str(target), url], check=True))))
                target.unlink()
                add("curl_first_byte_s", curl_first_byte(url))
                add("curl_to_null_s", timed(lambda: subprocess.run(
                    ["curl", "-sf", "-o", os.devnull, url], check=True)))
                add("receive_read1_s", timed(lambda: receive_read1(url)))
                add("receive_readinto1_s", timed(lambda: receive_readinto1(url)))
                add("sha256_s", timed(lambda: hash_alone(size)))
                wrote, synced = write_alone(work / "write.out", size)
                add("write_s", wrote)
                add("fsync_after_plain_write_s", synced)
                os.sync()
                handed, finished = sink_alone(work / "write.out", size)
                add("sink_handed_over_s", handed)
                add("sink_finish_s", finished)
                add("sink_total_s", handed + finished)
                os.sync()
                wrote, synced = write_direct_alone(work / "write.out", size)
                add("write_direct_s", wrote)
                add("fsync_after_direct_s", synced)
                models = work / f"models-{run}"
                models.mkdir()
                for key, value in hub_cpu_of("pull", lambda m=models: pull_phases(
                        endpoint, m)).items():
                    add(f"pull_{key}", value)
                shutil.rmtree(models)
                models.mkdir()
                add("cli_dry_run_s", cli_pull(endpoint, models, "--dry-run"))
                add("cli_pull_s", hub_cpu_of("cli", lambda m=models: cli_pull(endpoint, m)))
                shutil.rmtree(models)
                print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()),
                      flush=True)
    median = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    rates = {k.removesuffix("_s") + "_mb_per_s": round(size / v / MB, 1)
             for k, v in median.items()
             if v > 0 and k in ("curl_to_file_s", "curl_to_null_s", "receive_read1_s",
                      "receive_readinto1_s", "sha256_s", "write_s", "write_direct_s", "sink_total_s",
                      "pull_body_s", "pull_total_s", "cli_pull_s")}
    result = {"bytes": size, "runs": args.runs, "median_s": median, "median_rates": rates,
              "all_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
              "load_average": os.getloadavg()[0]}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median_s": median, "median_rates": rates}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
