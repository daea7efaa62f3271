"""The hub's metadata answer, read with bounds: what a broken or hostile mirror sends is refused
with a clear error, never used (a sha256 names a file on disk). The request is huggingface-hub's
(its token and user agent, its reading of refusals) without importing its HTTP stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.library.errors import BadHubAnswer, GatedRepo, LibraryError, RepoNotFound
from appliance.library.hub import MAX_FILES, Hub, HubFile, read_model_info
from appliance.library.pull import Library
from appliance.library.refs import HubRef
from tests.library.conftest import GATED_REPO, GGUF_REPO
from tests.library.hub_server import LocalHub

SHA = "ab" * 32


def test_a_good_answer_gives_sizes_and_lfs_sha256s() -> None:
    sha, files = read_model_info("a/b", {"sha": "0123abc", "siblings": [
        {"rfilename": "m-Q4_K_M.gguf", "size": 10, "lfs": {"size": 10, "sha256": SHA.upper()}},
        {"rfilename": "README.md", "size": 5},
        {"rfilename": "x.gguf", "lfs": {"size": 7, "sha256": SHA}}]})
    assert sha == "0123abc"
    assert files == [HubFile("m-Q4_K_M.gguf", 10, SHA), HubFile("README.md", 5, None),
                     HubFile("x.gguf", 7, SHA)]


@pytest.mark.parametrize("answer", [
    None, [], "text", {"siblings": "x"}, {"siblings": [1]}, {"siblings": [{"size": 3}]},
    {"siblings": [{"rfilename": ""}]}, {"siblings": [{"rfilename": "a" * 1001}]},
    {"siblings": [{"rfilename": "a", "size": -1}]},
    {"siblings": [{"rfilename": "a", "size": True}]},
    {"siblings": [{"rfilename": "a", "size": "12"}]},
    {"siblings": [{"rfilename": "a", "size": 2**60}]},
    {"siblings": [{"rfilename": "a", "lfs": "x"}]},
    {"siblings": [{"rfilename": "a", "lfs": {"size": 3, "sha256": "../../etc/passwd"}}]},
    {"siblings": [{"rfilename": "a", "lfs": {"size": 3, "sha256": SHA[:-1] + "g"}}]},
    {"siblings": [], "sha": "../x"}, {"siblings": [], "sha": 5},
])
def test_a_malformed_answer_is_refused(answer: Any) -> None:
    with pytest.raises(BadHubAnswer, match="malformed") as e:
        read_model_info("a/b", answer)
    assert e.value.status == 502 and "\n" not in e.value.message


def test_too_many_files_are_refused_before_reading_them() -> None:
    with pytest.raises(LibraryError, match="files; that is not a model"):
        read_model_info("a/b", {"siblings": [{}] * (MAX_FILES + 1)})


def test_a_hostile_mirror_naming_files_by_path_is_refused(library: Library,
                                                          hub: LocalHub) -> None:
    """Through huggingface-hub's session and the local hub: a sha256 that is a path."""
    hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"].sha256 = "../../outside"
    with pytest.raises(BadHubAnswer, match=r"sha256 of Tiny-Q4_K_M\.gguf"):
        library.plan(GGUF_REPO)
    assert hub.gets.total() == 0
    assert not any(library.models_dir.rglob("*.partial"))


def test_planning_imports_no_http_stack_of_huggingface_hub(hub: LocalHub,
                                                             tmp_path: Path) -> None:
    """HfApi, huggingface-hub's session and its header helpers (httpx2 with them) cost every CLI
    pull 0.3-0.5 s before its first byte; their request is ours (in a fresh interpreter: this one
    may have imported them for another test)."""
    code = ("import sys; from pathlib import Path; from appliance.library.hub import Hub; "
            "from appliance.library.pull import Library; "
            f"plan = Library(Path({str(tmp_path)!r}), hub=Hub({hub.url!r}, token=False))"
            f".plan({GGUF_REPO!r}); "
            "print(plan.hub.files[0].sha256, *(m in sys.modules for m in ("
            "'huggingface_hub.hf_api', 'huggingface_hub.utils._http', 'httpx2', 'httpx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == [hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"].sha256] + ["False"] * 4


@pytest.mark.parametrize("token, env, in_file", [
    (False, {"HF_TOKEN": "hf_env"}, "hf_file"), ("hf_given", {}, "hf_file"),
    (None, {"HF_TOKEN": "hf_env"}, "hf_file"), (None, {}, "hf_file"), (None, {}, None),
    (None, {"HF_TOKEN": " \n"}, "hf_file"), (None, {"HF_TOKEN": ""}, None),
    (True, {"HUGGING_FACE_HUB_TOKEN": "hf_old_env"}, None),
    (None, {"HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_TOKEN": "hf_env"}, None),
])
def test_headers_are_huggingface_hubs(token: Any, env: dict[str, str], in_file: str | None,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same token as build_hf_headers sends, from the same places, and our user agent."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN",
                        "HF_HUB_DISABLE_IMPLICIT_TOKEN" in env)
    token_file = tmp_path / "token"
    if in_file:
        token_file.write_text(in_file + "\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    ours = Hub("http://127.0.0.1:9", token=token).headers()
    theirs = build_hf_headers(token=token, library_name="qwen-appliance")
    assert ours.get("authorization") == theirs.get("authorization")
    assert ours["user-agent"].startswith("qwen-appliance/")


def test_a_token_opens_a_gated_repo_and_refusals_read_as_huggingface_hubs(
        hub: LocalHub) -> None:
    assert Hub(hub.url, token="hf_test").plan(HubRef(GATED_REPO)).files
    with pytest.raises(GatedRepo, match="is gated"):
        Hub(hub.url, token=False).plan(HubRef(GATED_REPO))
    with pytest.raises(RepoNotFound, match="does not exist"):
        Hub(hub.url, token=False).plan(HubRef("nobody/Nothing-GGUF"))


def test_offline_mode_is_one_clear_line(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE (read by huggingface-hub at import, hence a child process): the metadata
    request over its session is refused before any connection, as HfApi's was."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "APPLIANCE_CONFIG": str(tmp_path / "absent.toml"), "APPLIANCE_GPU": "none"}
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "pull", GGUF_REPO,
                           "--models-dir", str(tmp_path / "models"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "appliance: error: HF_HUB_OFFLINE is set: the hub is not asked (hint: unset "
        "HF_HUB_OFFLINE, or pull a local file)"]


def test_an_oversized_answer_is_refused_while_it_is_read(hub: LocalHub,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The model info is read up to a bound (a hostile mirror could stream forever)."""
    from appliance.library import hub as hub_module

    monkeypatch.setattr(hub_module, "MAX_INFO_BYTES", 100)
    with pytest.raises(BadHubAnswer, match="over 100 bytes"):
        Hub(hub.url, token=False).plan(HubRef(GGUF_REPO))
    monkeypatch.setattr(hub_module, "MAX_INFO_BYTES", 2**20)
    assert Hub(hub.url, token=False).plan(HubRef(GGUF_REPO)).files
