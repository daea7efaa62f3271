"""What the installer installs: pins that match what the code relies on, checked on the installed
versions."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version
from pydantic import BaseModel

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


class EchoBody(BaseModel):  # at module level: FastAPI resolves the annotation by name
    model: str


def test_fastapi_pin_refuses_bodies_that_are_not_json() -> None:
    # A web page may post text/plain or a body without a Content-Type with no CORS preflight;
    # our security middleware answers those with 415, and FastAPI >= 0.132 is the second layer:
    # it parses neither as JSON. Checked on a bare app, so the middleware cannot hide it.
    spec = requirement("fastapi").specifier
    assert not spec.contains("0.131.9") and spec.contains(version("fastapi"))
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.post("/echo")
    def echo(body: EchoBody) -> dict:
        return {"model": body.model}

    payload = b'{"model": "m"}'
    with TestClient(app) as client:
        assert client.post("/echo", content=payload,
                           headers={"content-type": "application/json"}).json() == {"model": "m"}
        for headers in ({"content-type": "text/plain"}, {}):
            assert client.post("/echo", content=payload, headers=headers).status_code == 422
