"""Converter figures: peak memory, wall time against reading the files once, output sizes.

    python bench/convert_memory.py --shape qwen3-1.7b [--work DIR]

Builds a random-weight checkpoint of the shape (cached in DIR), then in one run:
- times `cat shards > /dev/null` (reading the checkpoint once) as the baseline;
- runs convert + quantize (Q4_K_M) in a child process, sampling its RssAnon and VmRSS from
  /proc every 20 ms (pages of memory-mapped inputs are page cache, so RssAnon is the figure);
- converts to F16 too, for the size ratio.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converter.synthetic import SHAPES, build_checkpoint, tensor_shapes

CHILD = """
import json, sys, time
from pathlib import Path
from converter.pipeline import ConvertOptions, convert
r = convert(ConvertOptions(source=sys.argv[1], out=Path(sys.argv[2]), quant=sys.argv[3],
                           force=True, quiet=True))
print(json.dumps(r.timings))
"""


def sample_memory(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                kib = int(value.split()[0])
                peaks[key] = max(peaks.get(key, 0), kib * 1024)
        time.sleep(0.02)


def run_convert(folder: Path, out: Path, quant: str) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(out), quant],
                            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, peaks, stop))
    sampler.start()
    started = time.perf_counter()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"convert failed with {proc.returncode}")
    return {"wall_s": wall, **json.loads(stdout), "peak_rss_anon": peaks.get("RssAnon", 0),
            "peak_rss": peaks.get("VmRSS", 0), "size": out.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/appliance-bench"))
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    folder = args.work / args.shape
    if not (folder / "config.json").exists():
        build_checkpoint(folder, shape, shards=4)
    shards = sorted(folder.glob("*.safetensors"))

    started = time.perf_counter()
    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)
    read_s = time.perf_counter() - started

    q4 = run_convert(folder, args.work / f"{args.shape}-q4_k_m.gguf", "Q4_K_M")
    f16 = run_convert(folder, args.work / f"{args.shape}-f16.gguf", "F16")

    largest_f32 = max(int(np.prod(d)) for d in tensor_shapes(shape).values()) * 4
    bound = 2 * largest_f32 + 256 * 2**20
    eight_b = SHAPES["qwen3-8b"]
    largest_8b = max(int(np.prod(d)) for d in tensor_shapes(eight_b).values()) * 4
    gib = 2**30
    print(json.dumps({
        "shape": args.shape,
        "checkpoint_gib": round(sum(p.stat().st_size for p in shards) / gib, 2),
        "read_once_s": round(read_s, 1),
        "convert_s": round(q4["convert_s"], 1),
        "quantize_s": round(q4["quantize_s"], 1),
        "convert_over_read": round(q4["convert_s"] / read_s, 2),
        "quantize_over_read": round(q4["quantize_s"] / read_s, 2),
        "peak_rss_anon_gib": round(q4["peak_rss_anon"] / gib, 2),
        "peak_rss_gib": round(q4["peak_rss"] / gib, 2),
        "bound_gib": round(bound / gib, 2),
        "within_bound": q4["peak_rss_anon"] <= bound,
        "f16_peak_rss_anon_gib": round(f16["peak_rss_anon"] / gib, 2),
        "q4_k_m_size_gib": round(q4["size"] / gib, 3),
        "f16_size_gib": round(f16["size"] / gib, 3),
        "q4_over_f16": round(q4["size"] / f16["size"], 3),
        "qwen3_8b_bound_gib": round((2 * largest_8b + 256 * 2**20) / gib, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
