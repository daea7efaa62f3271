"""Tray figures: CPU and memory of `appliance tray` idling against a running daemon.

    python bench/tray_idle.py MODELS_DIR MODEL_ID [--seconds 30]

Starts Xvfb, trayer, the daemon and the tray; samples the tray process with psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    display = ":93"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DISPLAY": display, "APPLIANCE_PORT": str(port),
           "APPLIANCE_MODELS_DIR": str(args.models_dir), "APPLIANCE_DEFAULT_MODEL": args.model,
           "APPLIANCE_CONFIG": "/nonexistent.toml", "APPLIANCE_LOG_LEVEL": "warning"}
    procs = [subprocess.Popen(["Xvfb", display, "-screen", "0", "640x120x24"],
                              stderr=subprocess.DEVNULL)]
    try:
        time.sleep(1)
        procs.append(subprocess.Popen(["trayer", "--edge", "top", "--SetDockType", "true"],
                                      env=env, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env,
                                      cwd=REPO, stderr=subprocess.DEVNULL))
        time.sleep(2)
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        tray = subprocess.Popen([sys.executable, "-m", "appliance.cli", "tray"], env=env,
                                cwd=REPO, stderr=subprocess.DEVNULL)
        procs.append(tray)
        time.sleep(5)  # let it settle
        p = psutil.Process(tray.pid)
        before = sum(p.cpu_times()[:2])
        rss = []
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            rss.append(p.memory_info().rss)
            time.sleep(1)
        cpu = (sum(p.cpu_times()[:2]) - before) / (time.monotonic() - started) * 100
        print(json.dumps({"tray_cpu_percent_of_one_core": round(cpu, 2),
                          "tray_rss_mib_max": round(max(rss) / 2**20, 1),
                          "seconds": args.seconds}, indent=2))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
