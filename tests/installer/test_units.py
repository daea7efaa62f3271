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
