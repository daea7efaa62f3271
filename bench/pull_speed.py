"""Download overhead of `appliance pull`: a 1 GB GGUF from the local test hub against curl
fetching the same file from the same server, in the same run (alternating, median of N each;
the exit status says whether the median ratio of the like-for-like pair reaches 0.8).

Like with like: every contender is a process of its own, timed from its start to its exit, and
writes the same bytes to the same disk; the hub runs in a process of its own (sendfile, as a
real server would). Each run starts with nothing dirty in the page cache (the previous file
deleted, then a sync, untimed), so no contender pays for another's writeback. Contenders:
- `curl`: only writes (its bytes may still sit in the page cache when it exits);
- `curl && sha256sum && sync FILE`: every byte checked and durable before it exits (what the pull
  did until it left the disk to settling); coreutils' sha256sum may not use the CPU's SHA
  instructions, so also
- `curl && openssl dgst -sha256 && sync FILE`: the same with OpenSSL's hash (the pull's);
- `appliance pull` (the CLI): start-up, the hub metadata call, download with sha256 of every
  byte, size and GGUF header checks, the manifest (fsynced, marked), rename. Like curl it exits
  with bytes in the page cache; the process it leaves behind settles the model (fsync, the mark
  removed: appliance/library/durability.py). The bench waits for that, untimed, before the next
  contender, and records how long after the command's exit the model was on the disk;
- the pull in this process (Library.pull after its plan): the transfer alone, without start-up
  and metadata, comparable with earlier results.

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
from appliance.library.manifest import read_manifest  # noqa: E402
from appliance.library.pull import Library  # noqa: E402

MODEL_ID = "big-f32"


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


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def start_hub(source: Path) -> Iterator[str]:
    """The test hub's URL (hub_process without its pid)."""
    with hub_process(source) as (url, _):
        yield url


@contextlib.contextmanager
def hub_process(source: Path) -> Iterator[tuple[str, int]]:
    """The test hub in a process of its own serving `source` as bench/Big-GGUF; (URL, pid)."""
    hub = subprocess.Popen([sys.executable, "-m", "tests.library.hub_server",
                            "bench/Big-GGUF", f"{source.name}={source}"], cwd=REPO,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert hub.stdout is not None and hub.stdin is not None
    try:
        yield hub.stdout.readline().strip(), hub.pid
    finally:
        hub.stdin.close()
        hub.wait(timeout=30)


def pull_env(endpoint: str, work: Path) -> dict[str, str]:
    """The command's environment: bytecode cached as in an installed copy (pip compiles it at
    install; PYTHONDONTWRITEBYTECODE, set on our CI machines, would time a compile per run)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "HF_ENDPOINT": endpoint, "HF_TOKEN": "",
            "APPLIANCE_CONFIG": str(work / "absent.toml"), "APPLIANCE_GPU": "none"}


def compile_once(endpoint: str, work: Path) -> None:
    """One untimed dry run: the command's modules compiled, as an installed copy has them."""
    subprocess.run([sys.executable, "-m", "appliance.cli", "pull", "bench/Big-GGUF",
                    "--dry-run", "--models-dir", str(work)], check=True, cwd=REPO,
                   env=pull_env(endpoint, work), stdout=subprocess.DEVNULL)


class Contenders:
    """Each way of getting the file, timed from its start to the file complete."""

    def __init__(self, work: Path, endpoint: str) -> None:
        self.work = work
        self.endpoint = endpoint
        self.url = f"{endpoint}/bench/Big-GGUF/resolve/main/Big-F32.gguf"
        self.target = work / "curl.out"
        self.models = work / "models"

    def clean(self) -> None:
        """Nothing of the last run left, nothing dirty in the page cache."""
        self.target.unlink(missing_ok=True)
        shutil.rmtree(self.models, ignore_errors=True)
        self.models.mkdir()
        os.sync()

    def settled_after(self) -> float:
        """Seconds until the model the command left behind is on the disk (its settle process
        done), counted from now, the command's exit; untimed, so no contender shares the disk
        with it."""
        started = time.perf_counter()
        while (manifest := read_manifest(self.models, MODEL_ID)) is None or \
                manifest.unsynced_in is not None:
            if time.perf_counter() - started > 120:
                raise RuntimeError("the pull was not settled within 120 s")
            time.sleep(0.005)
        return time.perf_counter() - started

    def curl(self) -> None:  # each returns None, or when its timed part began
        subprocess.run(["curl", "-sf", "-o", str(self.target), self.url], check=True)

    def curl_checked(self) -> None:
        subprocess.run(f"curl -sf -o {self.target} {self.url} && sha256sum {self.target} "
                       f"&& sync {self.target}", shell=True, check=True,
                       stdout=subprocess.DEVNULL)

    def curl_checked_openssl(self) -> None:
        subprocess.run(f"curl -sf -o {self.target} {self.url} && openssl dgst -sha256 "
                       f"{self.target} && sync {self.target}", shell=True, check=True,
                       stdout=subprocess.DEVNULL)

    def pull_cli(self) -> None:
        subprocess.run([sys.executable, "-m", "appliance.cli", "pull", "bench/Big-GGUF",
                        "--models-dir", str(self.models)], check=True, cwd=REPO,
                       env=pull_env(self.endpoint, self.work), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def pull_in_process(self) -> float:
        """The transfer only: timed from after the metadata call (returns that moment)."""
        library = Library(self.models, hub=Hub(self.endpoint, token=False))
        plan = library.plan("bench/Big-GGUF")
        started = time.perf_counter()
        library.pull(plan)
        return started


NAMES = ("curl", "curl_checked", "curl_checked_openssl", "pull_cli", "pull_in_process")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/pull_speed.json")
    parser.add_argument("--contenders", default=",".join(NAMES),
                        help="which to run (curl and pull_cli always)")
    args = parser.parse_args()
    if args.size_mb < 64:
        parser.error("--size-mb is at least 64 (the file is made of 64 MB tensors)")
    names = tuple(n for n in NAMES if n in {"curl", "pull_cli", *args.contenders.split(",")})
    rates: dict[str, list[float]] = {name: [] for name in NAMES}
    cpu: dict[str, list[float]] = {name: [] for name in NAMES}
    hub_cpu: dict[str, list[float]] = {name: [] for name in NAMES}
    durable_after: list[float] = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        source = work / "Big-F32.gguf"
        make_gguf(source, args.size_mb)
        size = source.stat().st_size
        with hub_process(source) as (endpoint, hub_pid):
            contenders = Contenders(work, endpoint)
            subprocess.run(["curl", "-sf", "-o", os.devnull, contenders.url], check=True)
            compile_once(endpoint, work)
            for run in range(args.runs):
                # Alternating: each run starts with the next contender, so none always goes first.
                order = names[run % len(names):] + names[:run % len(names)]
                for name in order:
                    contenders.clean()
                    who = resource.RUSAGE_SELF if name == "pull_in_process" else \
                        resource.RUSAGE_CHILDREN
                    used, hub_used = cpu_seconds(who), process_cpu(hub_pid)
                    started = time.perf_counter()
                    started = getattr(contenders, name)() or started
                    rates[name].append(size / (time.perf_counter() - started))
                    cpu[name].append(cpu_seconds(who) - used)
                    hub_cpu[name].append(process_cpu(hub_pid) - hub_used)
                    if name == "pull_cli":
                        durable_after.append(contenders.settled_after())
                print(f"run {run + 1}: " + ", ".join(
                    f"{name} {rates[name][-1] / 1e6:.0f} MB/s ({cpu[name][-1]:.2f} s CPU)"
                    for name in names), flush=True)
            contenders.clean()

    def median(name: str) -> float:
        return float(np.median(rates[name])) if rates[name] else float("nan")

    result = {"bytes": size, "runs": args.runs,
              **{f"{name}_mb_per_s": [round(r / 1e6, 1) for r in rates[name]] for name in NAMES},
              # The figure of the issue, like for like: the pull command against curl.
              "ratio_median": round(median("pull_cli") / median("curl"), 3),
              "ratio_best": round(max(rates["pull_cli"]) / max(rates["curl"]), 3),
              # Against a curl that gives the pull's guarantees (sha256 checked, durable).
              "ratio_median_vs_checked": round(median("pull_cli") / median("curl_checked"), 3),
              "ratio_median_vs_checked_openssl": round(
                  median("pull_cli") / median("curl_checked_openssl"), 3),
              # Seconds from the command's exit until its model was on the disk (settled).
              "pull_cli_durable_after_exit_s": [round(d, 3) for d in durable_after],
              # The transfer alone (no start-up, no metadata call), as measured before.
              "ratio_median_in_process": round(median("pull_in_process") / median("curl"), 3),
              # CPU seconds (user + system) of each contender's processes (the in-process
              # pull: this process's threads), and the hub's for each.
              **{f"{name}_cpu_s": [round(c, 3) for c in cpu[name]] for name in NAMES},
              **{f"hub_cpu_s_{name}": [round(c, 3) for c in hub_cpu[name]] for name in NAMES},
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores",
              "load_average": os.getloadavg()[0],
              "note": "each contender a process of its own timed from start to exit (the "
                      "in-process pull: its transfer); a sync before each, untimed"}
    result = {k: None if v != v else v for k, v in result.items()}  # a NaN: not run
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["ratio_median"] >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
