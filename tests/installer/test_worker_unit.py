"""The RPC worker's user unit, checked by systemd itself (`systemd-analyze`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.installer.test_units import exposure, render, sections

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze")
TEMPLATE = "appliance-worker.service.in"


def test_worker_unit_verifies(tmp_path: Path) -> None:
    unit = render(TEMPLATE, tmp_path, "appliance-worker.service")
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr, result.stderr


def test_worker_unit_runs_the_worker_command_hardened(tmp_path: Path) -> None:
    service = sections(TEMPLATE)["Service"]
    assert service["ExecStart"] == ["@VENV@/bin/appliance worker"]
    # Loopback unless the user opts in through the environment file; never a host in the unit.
    assert not any("--host" in line or "--allow-network" in line for line in service["ExecStart"])
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(render(TEMPLATE, tmp_path, "appliance-worker.service")) < exposure(bare)


def test_the_installer_installs_it_without_enabling_it() -> None:
    install = (REPO / "installer" / "install.sh").read_text()
    assert "systemd/appliance-worker.service.in" in install
    commands = [line for line in install.splitlines() if not line.strip().startswith("#")]
    assert not any("enable" in line and "appliance-worker" in line for line in commands)
