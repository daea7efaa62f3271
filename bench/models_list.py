"""How long `appliance models` takes with 20 installed models (headers read, manifests, the fit
answer and expected speed for each), the daemon not running: a user's command, timed whole.

Each round times it cold (the header cache and the settings memo deleted: what the first call
after an install or a config change costs) and then warm (the usual call). Python's bytecode
is cached as in an installed copy (PYTHONDONTWRITEBYTECODE is dropped for the children, and one
untimed call compiles it).

    python bench/models_list.py [--models 20] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.library.fit import write_speed  # noqa: E402
from appliance.library.manifest import FileRecord, Manifest, write_manifest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/models_list.json")
    args = parser.parse_args()
    from converter.pipeline import ConvertOptions, convert
    from converter.synthetic import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # A real Qwen3 header (151,936-token vocabulary), tiny weights.
        checkpoint = build_checkpoint(work / "ckpt", "tiny", seed=1)
        models = work / "models"
        models.mkdir()
        first = models / "model-00-q4_k_m.gguf"
        convert(ConvertOptions(source=str(checkpoint), out=first, quiet=True))
        for i in range(1, args.models):
            os.link(first, models / f"model-{i:02d}-q4_k_m.gguf")
        for i in range(args.models):
            mid = f"model-{i:02d}-q4_k_m"
            write_manifest(models, Manifest(mid, "hub", [FileRecord(f"{mid}.gguf", 1, "0" * 64)],
                                            quant="Q4_K_M", repo="bench/Model-GGUF",
                                            revision="0" * 40))
        cache = work / "cache"
        write_speed({"cpu": {"bytes_per_s": 2e10}, "gpu_build": False}, cache / "qwen-appliance")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update({"APPLIANCE_MODELS_DIR": str(models), "APPLIANCE_PORT": "9",
                    "APPLIANCE_CONFIG": str(work / "absent.toml"), "XDG_CACHE_HOME": str(cache)})
        memo = cache / "qwen-appliance"

        def timed(into: list[float] | None = None) -> float:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "appliance.cli", "models"], env=env,
                                  capture_output=True, text=True, cwd=REPO)
            seconds = time.perf_counter() - started
            assert done.returncode == 0, done.stderr
            assert done.stdout.count("q4_k_m ") >= args.models, done.stdout
            assert "CPU only, ~" in done.stdout, done.stdout  # the fit and the speed are there
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if into is not None:  # CPU time: what a busy machine's wall clock hides
                into.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            return seconds

        timed()  # compiles the bytecode, as installing does
        cold, warm, cold_cpu, warm_cpu = [], [], [], []
        for _ in range(args.runs):
            for name in ("gguf_headers.json", "settings-snapshot.json"):
                (memo / name).unlink(missing_ok=True)
            cold.append(timed(cold_cpu))
            warm.append(timed(warm_cpu))
    result = {"models": args.models, "runs": args.runs,
              "warm_seconds": [round(t, 3) for t in warm],
              "median_s": round(statistics.median(warm), 3), "best_s": round(min(warm), 3),
              "cold_seconds": [round(t, 3) for t in cold],
              "cold_median_s": round(statistics.median(cold), 3),
              "warm_cpu_median_s": round(statistics.median(warm_cpu), 3),
              "cold_cpu_median_s": round(statistics.median(cold_cpu), 3),
              "load_average": os.getloadavg()[0], "cores": os.cpu_count()}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["median_s"] < 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
