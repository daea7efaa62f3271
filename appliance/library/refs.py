"""What `appliance pull REF` names: a hub repo (`owner/name[:TAG]`) or a local GGUF file or folder.

Everything here is bounded and validated before anything touches the network or the disk: a REF
arrives from the API as hostile input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from appliance.library.errors import BadReference

MAX_REF = 300
# The hub's own rules: 96 characters per part, no leading punctuation, no `..` or `--`.
# ASCII only: the hub's names are, and a non-ASCII one would fail later, in the HTTP request line.
_REPO = re.compile(r"^(?P<owner>[A-Za-z0-9][\w.-]{0,95})/(?P<name>[A-Za-z0-9][\w.-]{0,95})$",
                   re.ASCII)
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_REVISION = re.compile(r"^[A-Za-z0-9][\w./-]{0,99}$", re.ASCII)
# A model id is a lower-case file stem: no separators, no leading dot, bounded.
_MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,127}$")


@dataclass(frozen=True)
class HubRef:
    repo: str
    quant: str | None = None  # the tag after `:`, or --quant
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


@dataclass(frozen=True)
class LocalRef:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


Ref = HubRef | LocalRef


def check_quant(quant: str, param: str = "quant") -> str:
    if not _TAG.match(quant) or ".." in quant:
        raise BadReference(f"{quant[:50]!r} is not a quantization tag",
                           "e.g. Q4_K_M, Q5_K_M, Q8_0", param)
    return quant.upper()


def check_revision(revision: str) -> str:
    if not _REVISION.match(revision) or ".." in revision:
        raise BadReference(f"{revision[:50]!r} is not a branch, tag or commit",
                           "leave it out for the main branch", "revision")
    return revision


def check_model_id(model_id: str) -> str:
    """A model id as the registry makes them; anything else (`../x`, `/etc`) is refused."""
    mid = model_id.lower()
    if not _MODEL_ID.match(mid) or ".." in mid:
        raise BadReference(f"{model_id[:60]!r} is not a model id",
                           "see `appliance models` for the ids", "id")
    return mid


def looks_local(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.endswith(".gguf")


def parse_ref(text: str, quant: str | None = None, revision: str | None = None) -> Ref:
    """A hub repo (with an optional `:TAG`) or a local path; raises BadReference."""
    if not text or len(text) > MAX_REF or "\x00" in text or not text.isprintable():
        raise BadReference("the model reference is empty, too long or has control characters",
                           "e.g. Qwen/Qwen3-8B-GGUF or ./model.gguf", "model")
    if looks_local(text):
        try:
            return LocalRef(Path(text).expanduser())
        except RuntimeError:  # `~nobody/x.gguf`: no such user's home
            raise BadReference(f"{text[:80]!r} names the home of an unknown user",
                               "give a path to a .gguf file", "model") from None
    repo, _, tag = text.partition(":")
    match = _REPO.match(repo)
    if not match or ".." in repo or "--" in repo or repo.endswith((".", "-")):
        raise BadReference(f"{text[:80]!r} is not a hub repository",
                           "give owner/name, e.g. Qwen/Qwen3-8B-GGUF[:Q5_K_M], or a path to a "
                           ".gguf file", "model")
    if tag and quant and check_quant(tag) != check_quant(quant):
        raise BadReference(f"the tag {tag!r} and --quant {quant} disagree", "give one of them",
                           "quant")
    chosen = tag or quant
    return HubRef(repo, check_quant(chosen) if chosen else None,
                  check_revision(revision) if revision else None)
