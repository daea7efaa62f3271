"""The systemd units, checked by systemd itself (`systemd-analyze`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze")


def render(template: str, tmp_path: Path, name: str = "appliance.service") -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    exe = venv / "bin" / "appliance"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / name
    unit.write_text((REPO / "systemd" / template).read_text().replace("@VENV@", str(venv)))
    return unit


def exposure(unit: Path) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                         capture_output=True, text=True).stdout
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", out)
    assert match, out
    return float(match.group(1))


@pytest.mark.parametrize("template", ["appliance.service.in", "appliance-system.service.in"])
def test_unit_verifies(template: str, tmp_path: Path) -> None:
    unit = render(template, tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr, result.stderr  # no warnings about our unit


def test_system_unit_is_hardened(tmp_path: Path) -> None:
    assert exposure(render("appliance-system.service.in", tmp_path)) <= 4.0


def test_user_unit_is_better_than_bare(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    user = exposure(render("appliance.service.in", tmp_path))
    print(f"user unit exposure {user} (bare unit {exposure(bare)})")
    assert user < exposure(bare)


def test_units_use_the_daemons_readiness_and_stop_story() -> None:
    for template in ("appliance.service.in", "appliance-system.service.in"):
        text = (REPO / "systemd" / template).read_text()
        assert "Type=notify" in text and "ExecStart=@VENV@/bin/appliance serve" in text
        assert "Restart=on-failure" in text and "TimeoutStopSec=" in text


def sections(template: str) -> dict[str, dict[str, list[str]]]:
    """The unit's keys by section; a key may repeat (DeviceAllow=), so each maps to a list."""
    result: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / template).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = result.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            section.setdefault(key, []).append(value)
    return result


UNITS = ["appliance.service.in", "appliance-system.service.in"]


@pytest.mark.parametrize("template", UNITS)
def test_units_have_a_watchdog_the_daemon_can_keep(template: str) -> None:
    service = sections(template)["Service"]
    # The daemon pings every WATCHDOG_USEC/2; well above a slow step, well below a user's patience.
    assert 10 <= int(service["WatchdogSec"][-1]) <= 120
    assert service["NotifyAccess"] == ["main"]  # the pings come from the daemon's own process


@pytest.mark.parametrize("template", UNITS)
def test_a_crash_loop_stops(template: str) -> None:
    unit, service = sections(template)["Unit"], sections(template)["Service"]
    # In [Unit]: systemd ignores these in [Service] (with a warning) since v230.
    burst, interval = int(unit["StartLimitBurst"][-1]), int(unit["StartLimitIntervalSec"][-1])
    restart_sec = int(service["RestartSec"][-1])
    # The loop must be caught: `burst` restarts fit inside the interval.
    assert burst * restart_sec < interval and 2 <= burst <= 10
    assert service["RestartPreventExitStatus"] == ["78"]  # a settings mistake is not retried


@pytest.mark.parametrize(("template", "most"), [("appliance.service.in", 80),
                                                ("appliance-system.service.in", 95)])
def test_memory_limits_leave_the_machine_usable(template: str, most: int) -> None:
    service = sections(template)["Service"]
    high, top = (int(service[k][-1].rstrip("%")) for k in ("MemoryHigh", "MemoryMax"))
    assert service["MemoryMax"][-1].endswith("%")  # relative: fits any machine
    assert 50 <= high < top <= most


def test_unit_comments_name_only_real_installer_options() -> None:
    usage = (REPO / "installer" / "install.sh").read_text()
    for template in UNITS:
        for option in re.findall(r"install\.sh (--[\w-]+)", (REPO / "systemd" / template).read_text()):
            assert re.search(rf"^\s+{option}\)", usage, re.M), f"{template} names {option}"
