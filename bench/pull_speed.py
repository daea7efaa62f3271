"""Download overhead of `appliance pull`: a 1 GB GGUF from the local test hub, against curl
fetching the same file from the same server, in the same run (alternating, best and median of N
each; the exit status says whether the median ratio reaches 0.8).

The hub runs in a process of its own (as a real hub would: no interpreter shared with the pull).
The pull's time includes what makes it a pull: sha256 of every byte, the size check, the GGUF
header check, fsync and rename (not the hub metadata call before it: a fixed cost, not a
rate); curl only writes (its bytes may still sit in the page cache).
Both write to the same disk.

    python bench/pull_speed.py [--size-mb 1024] [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.library.hub import Hub  # noqa: E402
from appliance.library.pull import Library  # noqa: E402


def make_gguf(path: Path, size_mb: int) -> None:
    """A valid GGUF of about `size_mb` MB: 64 MB F32 tensors of random values."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(size_mb // 64)
    rng = np.random.default_rng(0)
    for i in range(size_mb // 64):
        writer.add_tensor(f"blk.{i}.ffn_down.weight",
                          rng.standard_normal((4096, 4096), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def start_hub(source: Path) -> Iterator[str]:
    """The test hub in a process of its own serving `source` as bench/Big-GGUF; its URL."""
    hub = subprocess.Popen([sys.executable, "-m", "tests.library.hub_server",
                            "bench/Big-GGUF", f"{source.name}={source}"], cwd=REPO,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert hub.stdout is not None and hub.stdin is not None
    try:
        yield hub.stdout.readline().strip()
    finally:
        hub.stdin.close()
        hub.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/pull_speed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        source = work / "Big-F32.gguf"
        make_gguf(source, args.size_mb)
        size = source.stat().st_size
        curl_rates, pull_rates, curl_cpu, pull_cpu = [], [], [], []
        with start_hub(source) as endpoint:
            url = f"{endpoint}/bench/Big-GGUF/resolve/main/Big-F32.gguf"
            for run in range(args.runs):
                target = work / "curl.out"
                used = cpu_seconds(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                subprocess.run(["curl", "-sf", "-o", str(target), url], check=True)
                curl_rates.append(size / (time.perf_counter() - started))
                curl_cpu.append(cpu_seconds(resource.RUSAGE_CHILDREN) - used)
                target.unlink()
                models = work / f"models-{run}"
                models.mkdir()
                library = Library(models, hub=Hub(endpoint, token=False))
                plan = library.plan("bench/Big-GGUF")
                used = cpu_seconds(resource.RUSAGE_SELF)
                started = time.perf_counter()
                library.pull(plan)
                pull_rates.append(size / (time.perf_counter() - started))
                pull_cpu.append(cpu_seconds(resource.RUSAGE_SELF) - used)
                shutil.rmtree(models)
                print(f"run {run + 1}: curl {curl_rates[-1] / 1e6:.0f} MB/s "
                      f"({curl_cpu[-1]:.2f} s CPU), pull {pull_rates[-1] / 1e6:.0f} MB/s "
                      f"({pull_cpu[-1]:.2f} s CPU)", flush=True)
    result = {"bytes": size, "runs": args.runs,
              "curl_mb_per_s": [round(r / 1e6, 1) for r in curl_rates],
              "pull_mb_per_s": [round(r / 1e6, 1) for r in pull_rates],
              "ratio_best": round(max(pull_rates) / max(curl_rates), 3),
              "ratio_median": round(float(np.median(pull_rates) / np.median(curl_rates)), 3),
              # CPU seconds (user + system) of curl's process and of the pull's threads: what
              # a loaded machine's numbers cannot hide (the hub's own CPU is in neither).
              "curl_cpu_s": [round(c, 3) for c in curl_cpu],
              "pull_cpu_s": [round(c, 3) for c in pull_cpu],
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores",
              "load_average": os.getloadavg()[0],
              "note": "pull includes sha256 of every byte, header check, fsync and rename; "
                      "the hub is a separate process"}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["ratio_median"] >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
