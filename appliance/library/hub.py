"""Resolve a hub repository into what to download: the GGUF file(s) for a quantization, or the
safetensors checkpoint for our converter, with sizes and LFS sha256s from the hub's metadata.

The hub as huggingface-hub sees it: its endpoint (passed explicitly: it reads HF_ENDPOINT once,
at import), URL template, token settings and user agent, and HfApi.model_info's request (same
URL and parameters, its refusals read the way hf_raise_for_status reads them). The request
itself goes over the library's transport (transport.py): importing HfApi, huggingface-hub's
session or its header helpers cost every `appliance pull` 0.3-0.5 s before its first byte on a
2-core VM. Behind a proxy, huggingface-hub's session makes the call. The answer is read here
with bounds on what we use.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from appliance import __version__
from appliance.library.errors import (
    TOKEN_HINT,
    BadHubAnswer,
    BadReference,
    GatedRepo,
    HubUnreachable,
    LibraryError,
    RepoNotFound,
)
from appliance.library.refs import HubRef

DEFAULT_QUANT = "Q4_K_M"
# `...-Q4_K_M`, `..._q5_k_m`, `.../IQ4_XS`, `...-UD-Q4_K_XL`, `...-BF16`: the tag ends the stem.
_QUANT_IN_NAME = re.compile(r"(?:^|[-_./])((?:UD-)?(?:I?Q[0-9][A-Z0-9_]*|BF16|F16|F32))$", re.I)
SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.I)
MAX_FILES = 10_000  # a repo listing past this is refused, not walked
MAX_INFO_BYTES = 64 * 2**20  # a model info answer (10,000 files are ~3 MB); more is refused


@dataclass(frozen=True)
class HubFile:
    name: str  # the path inside the repository
    size: int
    sha256: str | None  # the LFS sha256; None for small files kept in git


@dataclass
class HubPlan:
    """What a hub pull downloads, and what it becomes."""

    kind: str  # "gguf" or "safetensors"
    repo: str
    commit: str
    quant: str
    model_id: str
    files: list[HubFile]
    local_names: list[str] = field(default_factory=list)  # gguf: the names in the models folder
    quants: list[str] = field(default_factory=list)  # every quantization the repo offers

    @property
    def download_bytes(self) -> int:
        return sum(f.size for f in self.files)


def quant_of(filename: str) -> str | None:
    """The quantization tag in a GGUF file's name (split suffix and folders included)."""
    name = filename
    split = SPLIT.match(PurePosixPath(name).name)
    stem = split.group("stem") if split else PurePosixPath(name).stem
    path = str(PurePosixPath(name).parent / stem) if "/" in name else stem
    match = _QUANT_IN_NAME.search(path)
    return match.group(1).upper() if match else None


def safe_stem(text: str) -> str:
    """A model id from a name: lower case, only [a-z0-9._+-], no leading dot."""
    cleaned = re.sub(r"[^a-z0-9._+-]+", "-", text.lower()).strip(".-")
    return cleaned[:100] or "model"


class Hub:
    """The hub (or a mirror at `endpoint`), reached through huggingface-hub."""

    def __init__(self, endpoint: str | None = None, token: str | bool | None = None,
                 timeout: float = 20.0) -> None:
        self._endpoint = endpoint
        self.token = token
        self.timeout = timeout

    @functools.cached_property
    def endpoint(self) -> str:
        # Resolved on first use: making a Hub (the daemon's first library request, on the
        # event loop) imports nothing.
        from huggingface_hub import constants

        return (self._endpoint or constants.ENDPOINT).rstrip("/")

    # -- calls -----------------------------------------------------------------------------

    def model_info(self, ref: HubRef) -> tuple[str | None, list[HubFile]]:
        """The repo's commit and files (with sizes and LFS sha256s): what HfApi.model_info(
        files_metadata=True) asks for, over the library's transport (transport.py)."""
        from huggingface_hub import constants

        from appliance.library.transport import proxied, read_all, stream

        if constants.HF_HUB_OFFLINE:
            raise HubUnreachable("HF_HUB_OFFLINE is set: the hub is not asked",
                                 "unset HF_HUB_OFFLINE, or pull a local file")
        url = f"{self.endpoint}/api/models/{ref.repo}"
        if ref.revision is not None:
            url += f"/revision/{quote(ref.revision, safe='')}"
        url += "?blobs=true"
        if proxied(url):
            return read_model_info(ref.repo, self._model_info_by_session(ref, url))
        with stream(url, self.headers(), ref.repo, self.timeout,
                    functools.partial(_info_refusal, ref)) as (_, read, _abort):
            body = read_all(read, MAX_INFO_BYTES, ref.repo)
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # refused below as malformed
        return read_model_info(ref.repo, data)

    def _model_info_by_session(self, ref: HubRef, url: str) -> Any:
        """Through huggingface-hub's session, which honours the proxy settings."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        from appliance.library.transport import hub_errors

        with hub_errors(ref.repo, ref.revision):
            response = get_session().get(url, headers=self.headers(), timeout=self.timeout)
            hf_raise_for_status(response)
        try:
            return response.json()
        except ValueError:
            return None

    def file_url(self, repo: str, filename: str, commit: str) -> str:
        """hf_hub_url's answer for a model repo, from its own template: importing hf_hub_url
        (huggingface_hub.file_download) took 0.1-0.3 s of every CLI pull before its first
        byte, only to format a string (a test keeps the two equal)."""
        from huggingface_hub import constants

        url = constants.HUGGINGFACE_CO_URL_TEMPLATE.format(
            repo_id=repo, revision=quote(commit, safe=""), filename=quote(filename))
        return self.endpoint + url[len(constants.ENDPOINT):] if url.startswith(
            constants.ENDPOINT) else url

    def headers(self) -> dict[str, str]:
        """build_hf_headers' user agent and token, from huggingface-hub's own settings (its
        token file, HF_TOKEN, HF_HUB_DISABLE_IMPLICIT_TOKEN): importing build_hf_headers
        (huggingface_hub.utils, and httpx2 with it) cost every CLI pull ~0.5 s before its first
        byte. A test keeps the two equal."""
        import huggingface_hub
        from huggingface_hub import constants

        agent = (f"qwen-appliance/{__version__}; hf_hub/{huggingface_hub.__version__}; "
                 f"python/{platform.python_version()}")
        headers = {"user-agent": agent}
        token = _token(self.token, constants)
        if token:
            headers["authorization"] = f"Bearer {token}"
        return headers

    # -- planning --------------------------------------------------------------------------

    def plan(self, ref: HubRef) -> HubPlan:
        sha, files = self.model_info(ref)
        commit = sha or ref.revision or "main"
        ggufs = [f for f in files if f.name.lower().endswith(".gguf")
                 and "mmproj" not in f.name.lower()]
        if ggufs:
            return plan_gguf(ref, commit, ggufs)
        if any(f.name == "config.json" for f in files) and any(
                f.name.endswith(".safetensors") for f in files):
            return plan_safetensors(ref, commit, files)
        raise RepoNotFound(f"{ref.repo} has neither GGUF files nor a safetensors checkpoint",
                           "pull a repo with .gguf files (e.g. Qwen/Qwen3-8B-GGUF) or a "
                           "transformers checkpoint (e.g. Qwen/Qwen3-8B)")


def _token(token: str | bool | None, constants: Any) -> str | None:
    """The token build_hf_headers would send: an explicit one, none for False, else (True, or
    None unless implicit tokens are disabled) huggingface-hub's own choice. Its order is OIDC
    (HF_OIDC_RESOURCE), HF_TOKEN or HUGGING_FACE_HUB_TOKEN, the token file (an OAuth token in it
    refreshed when near expiry), Colab's vault; where only the environment can answer, it is
    read here, else huggingface-hub's get_token answers (its import costs ~0.3 s)."""
    if isinstance(token, str):
        return token or None
    if token is False or (token is None and constants.HF_HUB_DISABLE_IMPLICIT_TOKEN):
        return None
    from_env = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "")
    from_env = from_env.replace("\r", "").replace("\n", "").strip()
    if not os.environ.get("HF_OIDC_RESOURCE") and (from_env or not (
            Path(constants.HF_TOKEN_PATH).exists() or "google.colab" in sys.modules)):
        return from_env or None
    from huggingface_hub.utils import get_token

    return get_token()


def _info_refusal(ref: HubRef, status: int, code: str | None) -> None:
    """huggingface-hub's reading of a refused model info (hf_raise_for_status), as ours."""
    if code == "GatedRepo":
        raise GatedRepo(f"hub repository {ref.repo} is gated", TOKEN_HINT)
    if code == "RevisionNotFound":
        raise RepoNotFound(f"hub repository {ref.repo} has no revision {ref.revision}",
                           "leave out --revision for the main branch")
    if status == 401:  # the hub says 401 for a private, gated or absent repo without a token
        raise GatedRepo(f"hub repository {ref.repo} needs a token (it is private, gated or "
                        "absent)", TOKEN_HINT)
    if code == "RepoNotFound" or status == 404:
        raise RepoNotFound(f"hub repository {ref.repo} does not exist",
                           "check the spelling, e.g. Qwen/Qwen3-8B-GGUF")


_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_COMMIT = re.compile(r"^[0-9a-zA-Z._-]{1,100}$")


def read_model_info(repo: str, data: Any) -> tuple[str | None, list[HubFile]]:
    """(commit, files) from the hub's model info; a malformed answer (a broken or hostile
    mirror) is refused, never trusted: a sha256 names the partial file on disk."""

    def malformed(what: str) -> BadHubAnswer:
        return BadHubAnswer(f"the hub's answer about {repo} is malformed ({what})",
                            "check HF_ENDPOINT, or try again later")

    if not isinstance(data, Mapping):
        raise malformed("not an object")
    siblings = data.get("siblings") or []
    if not isinstance(siblings, list):
        raise malformed("siblings")
    if len(siblings) > MAX_FILES:
        raise LibraryError(f"{repo} lists {len(siblings)} files; that is not a model "
                           "repository we can pull", "choose a GGUF or safetensors repo")
    sha = data.get("sha")
    if sha is not None and not (isinstance(sha, str) and _COMMIT.match(sha)):
        raise malformed("sha")
    files = []
    for item in siblings:
        name = item.get("rfilename") if isinstance(item, Mapping) else None
        if not isinstance(name, str) or not 0 < len(name) <= 1000:
            raise malformed("a file name")
        lfs = item.get("lfs")
        if lfs is not None and not isinstance(lfs, Mapping):
            raise malformed(f"lfs of {name[:80]}")
        size = item.get("size") or (lfs or {}).get("size") or 0
        digest = (lfs or {}).get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**50:
            raise malformed(f"size of {name[:80]}")
        if digest is not None and not (isinstance(digest, str) and _SHA256.match(digest)):
            raise malformed(f"sha256 of {name[:80]}")
        files.append(HubFile(name, size, digest.lower() if digest else None))
    return sha, files


def plan_gguf(ref: HubRef, commit: str, ggufs: list[HubFile]) -> HubPlan:
    by_quant: dict[str, list[HubFile]] = {}
    for f in ggufs:
        by_quant.setdefault(quant_of(f.name) or "UNKNOWN", []).append(f)
    quants = sorted(q for q in by_quant if q != "UNKNOWN")
    if ref.quant:
        quant = ref.quant
    elif DEFAULT_QUANT in by_quant:
        quant = DEFAULT_QUANT
    elif len(by_quant) == 1:
        quant = next(iter(by_quant))
    else:
        raise BadReference(f"{ref.repo} has several quantizations and none is {DEFAULT_QUANT}",
                           f"choose one: {', '.join(quants)} (e.g. {ref.repo}:{quants[0]})",
                           "quant")
    chosen = by_quant.get(quant)
    if not chosen:
        raise RepoNotFound(f"{ref.repo} has no {quant} file",
                           f"it offers {', '.join(quants) or 'no tagged files'}", "quant")
    files = pick_group(ref.repo, quant, chosen)
    local = [safe_stem(PurePosixPath(f.name).stem) + ".gguf" for f in files]
    split = SPLIT.match(local[0])
    model_id = split.group("stem") if split else local[0].removesuffix(".gguf")
    return HubPlan("gguf", ref.repo, commit, quant, model_id, files, local, quants)


def pick_group(repo: str, quant: str, files: list[HubFile]) -> list[HubFile]:
    """One model's files: a single GGUF, or every part of a split one (in order), complete."""
    singles = [f for f in files if not SPLIT.match(PurePosixPath(f.name).name)]
    if singles:
        return [min(singles, key=lambda f: len(f.name))]
    groups: dict[str, list[HubFile]] = {}
    for f in files:
        match = SPLIT.match(PurePosixPath(f.name).name)
        assert match is not None
        key = str(PurePosixPath(f.name).parent / match.group("stem"))
        groups.setdefault(key, []).append(f)
    key = min(groups)
    parts = sorted(groups[key], key=lambda f: f.name)
    count = int(SPLIT.match(PurePosixPath(parts[0].name).name).group("count"))  # type: ignore[union-attr]
    numbers = [int(SPLIT.match(PurePosixPath(f.name).name).group("part")) for f in parts]  # type: ignore[union-attr]
    if numbers != list(range(1, count + 1)):
        raise RepoNotFound(f"{repo}'s {quant} model is split in {count} parts, but the repo has "
                           f"parts {numbers}", "report it to the repo's owner")
    return parts


def plan_safetensors(ref: HubRef, commit: str, files: list[HubFile]) -> HubPlan:
    from converter.quantize import QUANT_TYPES
    from converter.source import HUB_PATTERNS

    quant = ref.quant or DEFAULT_QUANT
    if quant not in QUANT_TYPES:
        raise BadReference(f"the converter cannot make {quant}",
                           f"choose one of {', '.join(QUANT_TYPES)}", "quant")
    wanted = [f for f in files if any(fnmatch.fnmatch(PurePosixPath(f.name).name, p)
                                      for p in HUB_PATTERNS) and "/" not in f.name]
    model_id = f"{safe_stem(ref.repo.split('/')[1])}-{quant.lower()}"
    return HubPlan("safetensors", ref.repo, commit, quant, model_id, wanted,
                   quants=list(QUANT_TYPES))
