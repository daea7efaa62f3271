"""Pulls through the real huggingface-hub code against the local hub: GGUF and safetensors repos,
quant tags, split files, a cut download resumed, a corrupt file, a full disk, no hub, a gated
repo. Each checks what is left in the models folder, which must only ever hold whole models."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from appliance.gguf_info import read_gguf_info
from appliance.library.errors import (
    BadReference,
    GatedRepo,
    HubUnreachable,
    IntegrityError,
    NotEnoughSpace,
    RepoNotFound,
)
from appliance.library.hub import Hub
from appliance.library.manifest import installed, read_manifest
from appliance.library.progress import Progress
from appliance.library.pull import Library
from appliance.registry import Registry
from tests.library.conftest import GATED_REPO, GGUF_REPO, SPLIT_REPO, ST_REPO
from tests.library.hub_server import LocalHub


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def visible(folder: Path) -> list[str]:
    """What a user (and the registry) sees in the models folder."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_pull_gguf_repo_default_quant(library: Library, hub: LocalHub) -> None:
    events: list[Progress] = []
    plan = library.plan(GGUF_REPO)
    assert (plan.kind, plan.quant, plan.model_id) == ("gguf", "Q4_K_M", "tiny-q4_k_m")
    assert plan.hub is not None and plan.hub.quants == ["Q4_K_M", "Q8_0"]
    model = library.pull(plan, events.append)
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    assert visible(library.models_dir) == ["tiny-q4_k_m.gguf", "tiny-q4_k_m.manifest.json"]
    assert sha256(model.path) == source.sha256
    manifest = read_manifest(library.models_dir, "tiny-q4_k_m")
    assert manifest is not None
    assert (manifest.repo, manifest.revision, manifest.quant) == (
        GGUF_REPO, hub.repos[GGUF_REPO].commit, "Q4_K_M")
    assert manifest.hub_files == ["Tiny-Q4_K_M.gguf"]
    assert manifest.files[0].sha256 == source.sha256
    stages = [e.stage for e in events]
    assert stages[0] == "resolve" and stages[-1] == "done"
    assert {"download", "verify", "install"} <= set(stages)
    last_download = [e for e in events if e.stage == "download"][-1]
    assert last_download.completed == last_download.total == source.size
    assert last_download.digest == f"sha256:{source.sha256}"
    # The registry the daemon uses sees exactly one usable model.
    entries = Registry(library.models_dir).scan()
    assert [(e.id, e.usable) for e in entries] == [("tiny-q4_k_m", True)]
    # Pulling again is a no-op: nothing is downloaded a second time.
    before = hub.gets[f"{GGUF_REPO}/Tiny-Q4_K_M.gguf"]
    again = library.plan(GGUF_REPO)
    assert again.up_to_date
    library.pull(again)
    assert hub.gets[f"{GGUF_REPO}/Tiny-Q4_K_M.gguf"] == before


def test_tag_chooses_the_quant(library: Library, hub: LocalHub) -> None:
    plan = library.plan(f"{GGUF_REPO}:q8_0")
    assert (plan.quant, plan.model_id) == ("Q8_0", "tiny-q8_0")
    library.pull(plan)
    assert visible(library.models_dir) == ["tiny-q8_0.gguf", "tiny-q8_0.manifest.json"]
    assert read_gguf_info(library.models_dir / "tiny-q8_0.gguf").quantization == "Q8_0"
    assert hub.gets[f"{GGUF_REPO}/Tiny-Q4_K_M.gguf"] == 0
    with pytest.raises(RepoNotFound, match="no Q5_K_M file") as e:
        library.plan(f"{GGUF_REPO}:Q5_K_M")
    assert "Q4_K_M, Q8_0" in e.value.hint


def test_split_gguf_keeps_its_parts_together(library: Library, hub: LocalHub,
                                             tiny_gguf: Path) -> None:
    plan = library.plan(SPLIT_REPO)
    assert plan.hub is not None and len(plan.hub.files) >= 2
    n = len(plan.hub.files)
    assert plan.model_id == "tiny-split-q4_k_m"
    model = library.pull(plan)
    names = [f"tiny-split-q4_k_m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert visible(library.models_dir) == sorted([*names, "tiny-split-q4_k_m.manifest.json"])
    assert [f.name for f in model.files] == names
    [listed] = installed(library.models_dir)
    assert listed.id == "tiny-split-q4_k_m" and listed.complete
    from appliance.library.listing import read_model_info

    whole = read_gguf_info(tiny_gguf)
    info = read_model_info(listed)
    assert info.parameter_count == whole.parameter_count
    assert info.layer_bytes() == whole.layer_bytes()
    # llama.cpp itself loads the model from its first part, finding the others beside it.
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model.path), n_ctx=64, verbose=False, n_threads=2)
    try:
        assert llm.n_vocab() == whole.array_lengths["tokenizer.ggml.tokens"]
        llm.eval(llm.tokenize(b"hello"))
    finally:
        llm.close()


def test_safetensors_repo_is_converted(library: Library, hub: LocalHub) -> None:
    events: list[Progress] = []
    plan = library.plan(ST_REPO)
    assert (plan.kind, plan.model_id, plan.quant) == ("safetensors", "tiny-q4_k_m", "Q4_K_M")
    # The whole need: download, the unquantized intermediate, the result.
    assert plan.need_bytes > plan.download_bytes + plan.result_bytes
    model = library.pull(plan, events.append)
    assert visible(library.models_dir) == ["tiny-q4_k_m.gguf", "tiny-q4_k_m.manifest.json"]
    assert not any((library.models_dir / ".pulls").rglob("*.safetensors"))  # only the GGUF kept
    info = read_gguf_info(model.path)
    assert info.quantization == "Q4_K_M"
    manifest = read_manifest(library.models_dir, "tiny-q4_k_m")
    assert manifest is not None and manifest.source == "hub+convert"
    assert manifest.converter_version and manifest.repo == ST_REPO
    assert manifest.files[0].sha256 == sha256(model.path)
    stages = [e.stage for e in events]
    for stage in ("download", "convert", "quantize", "verify", "install"):
        assert stage in stages
    assert stages.index("download") < stages.index("convert") < stages.index("quantize") \
        < stages.index("verify")


def test_cut_download_resumes(library: Library, hub: LocalHub) -> None:
    key = f"{GGUF_REPO}/Tiny-Q4_K_M.gguf"
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    hub.faults.cut_once[key] = 0.6
    model = library.pull(library.plan(GGUF_REPO))
    assert sha256(model.path) == source.sha256
    # The second request asked for the rest only: a Range from where the bytes stopped.
    cut_at = int(source.size * 0.6)
    assert [k for k, _ in hub.starts] == [key, key]
    assert hub.starts[0][1] == 0 and 0 < hub.starts[1][1] <= cut_at


def test_interrupted_pull_resumes_next_time(library: Library, hub: LocalHub) -> None:
    """A pull that died (the process killed) leaves its partial in .pulls/; the next pull
    fetches only the rest."""
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    plan = library.plan(GGUF_REPO)
    partial = library.staging(plan.model_id) / f"{source.sha256}.partial"
    partial.parent.mkdir(parents=True)
    half = source.size // 2
    partial.write_bytes(source.path.read_bytes()[:half])
    assert visible(library.models_dir) == []
    plan = library.plan(GGUF_REPO)
    assert plan.download_bytes == source.size - half
    sizes: list[int] = []
    model = library.pull(plan, lambda e: sizes.append(e.completed or 0)
                         if e.stage == "download" else None)
    assert sha256(model.path) == source.sha256
    assert min(s for s in sizes if s) >= half


def test_sha256_mismatch_is_refused_and_nothing_left(library: Library, hub: LocalHub) -> None:
    hub.faults.corrupt.add(f"{GGUF_REPO}/Tiny-Q4_K_M.gguf")
    with pytest.raises(IntegrityError, match=r"does not match the hub's sha256.*deleted"):
        library.pull(library.plan(GGUF_REPO))
    assert visible(library.models_dir) == []
    assert not list((library.models_dir / ".pulls").rglob("*.partial"))


def test_full_disk_is_refused_before_starting(hub: LocalHub, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    library = Library(folder, hub=Hub(hub.url, token=False), free_space=lambda _: 10 * 2**20)
    plan = library.plan(GGUF_REPO)
    with pytest.raises(NotEnoughSpace, match=r"needs .* GiB.*free") as e:
        library.pull(plan)
    assert "appliance du" in e.value.hint
    assert hub.gets.total() == 0  # not one byte was fetched
    assert visible(folder) == []
    st = library.plan(ST_REPO)
    with pytest.raises(NotEnoughSpace):
        library.pull(st)
    assert hub.gets.total() == 0


def test_hub_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    library = Library(tmp_path / "models", hub=Hub(f"http://127.0.0.1:{port}", token=False,
                                                   timeout=5))
    with pytest.raises(HubUnreachable, match="cannot reach the hub") as e:
        library.plan(GGUF_REPO)
    assert "\n" not in e.value.message
    assert "pull a local file" in e.value.hint


def test_hub_dropping_every_connection_fails_cleanly(library: Library, hub: LocalHub,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import appliance.library.download as download

    plan = library.plan(GGUF_REPO)
    hub.faults.down = True
    monkeypatch.setattr(download, "BACKOFF_S", (0.0,))  # the retries themselves are the test
    with pytest.raises(HubUnreachable, match="broke off"):
        library.pull(plan)
    assert visible(library.models_dir) == []


def test_gated_repo_hints_at_the_token(library: Library) -> None:
    with pytest.raises(GatedRepo, match="gated") as e:
        library.plan(GATED_REPO)
    assert "HF_TOKEN" in e.value.hint
    assert e.value.status == 403


def test_unknown_repo(library: Library) -> None:
    with pytest.raises(RepoNotFound, match="does not exist"):
        library.plan("tiny/Nope-GGUF")


@pytest.mark.parametrize("ref", ["../../x", "/etc/passwd/../x", "a" * 400, "tiny/x:../../q",
                                 "tiny/x:Q4_K_M/../../a", "tiny/..", "a/b/c", "tiny/x\x00",
                                 "tiny/x:" + "Q" * 60, "", "-x/y", "tiny/x--y",
                                 "~nouser-appliance-test/x.gguf", "Qw\u00e9n/x", "tiny/x\uff13"])
def test_bad_refs_are_refused_before_any_request(library: Library, hub: LocalHub,
                                                 ref: str) -> None:
    with pytest.raises((BadReference, RepoNotFound)):
        library.plan(ref)
    assert hub.gets.total() == 0
    assert visible(library.models_dir) == []


def test_local_import_links_or_copies(library: Library, tiny_gguf: Path, tmp_path: Path) -> None:
    outside = tmp_path / "downloads" / "My-Model-Q4_K_M.gguf"
    outside.parent.mkdir()
    outside.write_bytes(tiny_gguf.read_bytes())
    plan = library.plan(str(outside))
    assert (plan.kind, plan.model_id, plan.need_bytes) == ("local", "my-model-q4_k_m", 0)
    model = library.pull(plan)
    assert model.path.stat().st_ino == outside.stat().st_ino  # same disk: a hard link
    manifest = read_manifest(library.models_dir, "my-model-q4_k_m")
    assert manifest is not None and manifest.origin_path == str(outside)
    assert manifest.files[0].sha256 == sha256(tiny_gguf)
    broken = tmp_path / "downloads" / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(BadReference, match="not a usable GGUF"):
        library.pull(library.plan(str(broken)))
    assert visible(library.models_dir) == ["my-model-q4_k_m.gguf",
                                           "my-model-q4_k_m.manifest.json"]


def test_api_library_refuses_local_paths_outside_the_models_folder(
        hub: LocalHub, tmp_path: Path, tiny_gguf: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    library = Library(folder, hub=Hub(hub.url, token=False), local_root=folder)
    for ref in (str(tiny_gguf), f"{folder}/../../{tiny_gguf.name}", "~/.ssh/id_rsa.gguf"):
        with pytest.raises(BadReference, match="only from inside the models folder"):
            library.plan(ref)
    incoming = folder / "incoming"
    incoming.mkdir()
    (incoming / "x-q4_k_m.gguf").write_bytes(tiny_gguf.read_bytes())
    library.pull(library.plan(str(incoming / "x-q4_k_m.gguf")))
    assert "x-q4_k_m.gguf" in visible(folder)


def test_remove(library: Library) -> None:
    from appliance.errors import ModelNotFound

    library.pull(library.plan(SPLIT_REPO))
    removed = library.remove("tiny-split-q4_k_m")
    assert removed.removed_bytes > 0
    assert visible(library.models_dir) == []
    with pytest.raises(ModelNotFound):
        library.remove("tiny-split-q4_k_m")
    with pytest.raises(BadReference):
        library.remove("../../etc")


def test_a_whole_partial_is_checked_and_installed_without_a_request(library: Library,
                                                                    hub: LocalHub) -> None:
    """A pull cut short after its last byte (before the install) left a whole partial: the next
    pull hashes it and installs it, with no request for the file; a damaged one is refused."""
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    plan = library.plan(GGUF_REPO)
    partial = library.staging(plan.model_id) / f"{source.sha256}.partial"
    partial.parent.mkdir(parents=True)
    damaged = bytearray(source.path.read_bytes())
    damaged[len(damaged) // 3] ^= 1
    partial.write_bytes(bytes(damaged))
    with pytest.raises(IntegrityError, match="does not match"):
        library.pull(library.plan(GGUF_REPO))
    assert not partial.exists() and visible(library.models_dir) == []
    partial.write_bytes(source.path.read_bytes())
    plan = library.plan(GGUF_REPO)
    assert plan.download_bytes == 0
    model = library.pull(plan)
    assert sha256(model.path) == source.sha256
    assert hub.gets[f"{GGUF_REPO}/Tiny-Q4_K_M.gguf"] == 0


def test_behind_a_proxy_the_hub_session_carries_the_bytes_and_resumes(
        library: Library, hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set the download goes through huggingface-hub's session (it honours
    proxies) instead of http.client; the local hub plays the proxy too (it serves absolute-URI
    requests). A cut is resumed there as well."""
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, hub.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    key = f"{GGUF_REPO}/Tiny-Q4_K_M.gguf"
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    hub.faults.cut_once[key] = 0.6
    model = library.pull(library.plan(GGUF_REPO))
    assert sha256(model.path) == source.sha256
    assert [k for k, _ in hub.starts] == [key, key]
    assert hub.starts[0][1] == 0 and 0 < hub.starts[1][1] <= int(source.size * 0.6)


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:9/mirror"])
@pytest.mark.parametrize("repo, filename, commit", [
    ("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf", "0123456789abcdef0123456789abcdef01234567"),
    ("tiny/Tiny-Split-GGUF", "Q4_K_M/Tiny Split-00001-of-00002.gguf", "main"),
    ("a/b", "dir/ü#?%.gguf", "refs/pr/1"),
])
def test_file_urls_are_huggingface_hubs(endpoint: str | None, repo: str, filename: str,
                                        commit: str) -> None:
    """Our URL (formatted from huggingface-hub's template, without importing file_download)
    is the one hf_hub_url gives, quoting, revisions with slashes and mirrors included."""
    from huggingface_hub import hf_hub_url

    hub = Hub(endpoint, token=False)
    assert hub.file_url(repo, filename, commit) == hf_hub_url(repo, filename, revision=commit,
                                                              endpoint=hub.endpoint)


def test_ollama_digests_of_a_pulled_model_come_from_its_manifest(library: Library,
                                                                 hub: LocalHub) -> None:
    """/api/tags' digest of a pulled file is the sha256 checked during the pull, at once, with
    no second read of the file; a file changed since its manifest is hashed again."""
    import os
    import time

    from appliance.api.ollama_models import FileDigests

    model = library.pull(library.plan(GGUF_REPO))
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    [entry] = Registry(library.models_dir).scan()
    assert FileDigests().get(entry) == source.sha256  # known at once: nothing was hashed
    later = time.time() + 60
    os.utime(model.path, (later, later))  # written after its manifest: not trusted
    [entry] = Registry(library.models_dir).scan()
    digests = FileDigests()
    assert digests.get(entry) == ""  # hashed in the background, as any file
    deadline = time.monotonic() + 60
    while not (digest := digests.get(entry)):
        assert time.monotonic() < deadline, "no digest"
        time.sleep(0.05)
    assert digest == source.sha256
