"""What the installer installs: pins that match what the code relies on, checked on the installed
versions."""

from __future__ import annotations

import os
import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def requirement(name: str) -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == name]
    assert len(found) == 1, name
    return found[0]


def test_llama_cpp_python_is_pinned_exactly_everywhere() -> None:
    # We use its private llama_cpp._logger and llama_cpp.llama_grammar: any release may move them.
    spec = requirement("llama-cpp-python").specifier
    pinned = [s.version for s in spec if s.operator == "=="]
    assert len(pinned) == 1 and len(spec) == 1, spec
    for script in ("installer/install.sh", "tests/run"):
        built = re.search(r"^llama_version=(\S+)$", (REPO / script).read_text(), re.M)
        assert built and built.group(1) == pinned[0], script
    assert version("llama-cpp-python") == pinned[0]
    import llama_cpp._logger
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    assert callable(llama_cpp._logger.set_verbose) and JSON_GBNF and callable(json_schema_to_gbnf)


def test_uvicorn_is_pinned_to_the_minor_whose_private_names_we_use() -> None:
    import uvicorn

    spec = requirement("uvicorn").specifier
    installed = Version(version("uvicorn"))
    major, minor = installed.major, installed.minor
    assert spec.contains(installed) and spec.contains(f"{major}.{minor}.99")
    assert not spec.contains(f"{major}.{minor + 1}.0") and not spec.contains(f"{major}.{minor - 1}.0")
    server = uvicorn.Server(uvicorn.Config(app=None))
    assert callable(server.capture_signals) and server._captured_signals == []


def test_jinja2_has_the_sandbox_fixes() -> None:
    spec = requirement("jinja2").specifier
    assert not spec.contains("3.1.5") and spec.contains(version("jinja2"))


def test_fastapi_pin_refuses_bodies_that_are_not_json(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A web page may post text/plain or a body without a Content-Type with no CORS preflight;
    # FastAPI >= 0.132 parses neither as JSON. Checked on the daemon's own route.
    spec = requirement("fastapi").specifier
    assert not spec.contains("0.131.9") and spec.contains(version("fastapi"))
    from fastapi.testclient import TestClient

    from appliance.api.app import create_app
    from appliance.config import load_settings

    for name in [n for n in os.environ if n.upper().startswith("APPLIANCE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "absent.toml"))
    app = create_app(load_settings(models_dir=tmp_path, gpu="none"))
    body = b'{"model": "absent", "messages": [{"role": "user", "content": "hi"}]}'
    with TestClient(app, base_url="http://127.0.0.1") as client:
        accepted = client.post("/v1/chat/completions", content=body,
                               headers={"content-type": "application/json"})
        assert accepted.json()["error"]["code"] == "model_not_found"  # parsed, reached the route
        for headers in ({"content-type": "text/plain"}, {}):
            refused = client.post("/v1/chat/completions", content=body, headers=headers)
            assert refused.status_code == 400, headers
            assert refused.json()["error"]["code"] != "model_not_found", headers
