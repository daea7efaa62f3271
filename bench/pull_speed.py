"""Download overhead of `appliance pull`: a 1 GB GGUF from the local test hub, against curl
fetching the same file from the same server, in the same run (alternating, best of N each).

The pull's time includes what makes it a pull: sha256 of every byte, the size check, the GGUF
header check, fsync and rename. Both write to the same disk.

    python bench/pull_speed.py [--size-mb 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.library.hub import Hub  # noqa: E402
from appliance.library.pull import Library  # noqa: E402
from tests.library.hub_server import LocalHub, serve  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/pull_speed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        source = work / "Big-F32.gguf"
        make_gguf(source, args.size_mb)
        size = source.stat().st_size
        hub = LocalHub()
        hub.add("bench/Big-GGUF", {"Big-F32.gguf": source})
        curl_rates, pull_rates = [], []
        with serve(hub):
            url = f"{hub.url}/bench/Big-GGUF/resolve/main/Big-F32.gguf"
            for run in range(args.runs):
                target = work / "curl.out"
                started = time.perf_counter()
                subprocess.run(["curl", "-sf", "-o", str(target), url], check=True)
                curl_rates.append(size / (time.perf_counter() - started))
                target.unlink()
                models = work / f"models-{run}"
                models.mkdir()
                library = Library(models, hub=Hub(hub.url, token=False))
                started = time.perf_counter()
                library.pull(library.plan("bench/Big-GGUF"))
                pull_rates.append(size / (time.perf_counter() - started))
                shutil.rmtree(models)
                print(f"run {run + 1}: curl {curl_rates[-1] / 1e6:.0f} MB/s, "
                      f"pull {pull_rates[-1] / 1e6:.0f} MB/s", flush=True)
    result = {"bytes": size, "runs": args.runs,
              "curl_mb_per_s": [round(r / 1e6, 1) for r in curl_rates],
              "pull_mb_per_s": [round(r / 1e6, 1) for r in pull_rates],
              "ratio_best": round(max(pull_rates) / max(curl_rates), 3),
              "ratio_median": round(float(np.median(pull_rates) / np.median(curl_rates)), 3),
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{__import__('os').cpu_count()} cores",
              "note": "pull includes sha256 of every byte, header check, fsync and rename"}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["ratio_best"] >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
