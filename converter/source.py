"""Find the checkpoint: a local Hugging Face folder, or a hub repo id fetched with huggingface-hub."""

from __future__ import annotations

import re
from pathlib import Path

from converter.errors import SourceNotFoundError

# Only what conversion and verification read: weights, configs, tokenizer, template, model card.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "merges.txt", "vocab.json",
                "README.md", "LICENSE"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source: str, revision: str | None = None) -> Path:
    """Return a local folder holding the checkpoint, downloading from the hub when needed."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceNotFoundError("is a file, not a model folder",
                                      "point SOURCE at the folder that holds config.json", path)
        return path
    if not _REPO_ID.match(source):
        raise SourceNotFoundError("no such folder",
                                  "give a local folder or a hub repo id like Qwen/Qwen3-8B", path)
    return download(source, revision)


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch the needed files into the normal HF cache (progress bars from huggingface-hub)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except GatedRepoError:
        raise SourceNotFoundError(f"hub repository {repo_id} is gated",
                                  "accept its licence on the hub, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise SourceNotFoundError(f"hub repository {repo_id} does not exist (or is private)",
                                  "check the spelling, e.g. Qwen/Qwen3-8B") from None
    except RevisionNotFoundError:
        raise SourceNotFoundError(f"hub repository {repo_id} has no revision {revision}",
                                  "leave out --revision for the main branch") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            hint = "HF_HUB_OFFLINE is set and it is not in the cache: unset it or download first"
        else:
            hint = "the hub is unreachable; check the network or pass a local folder"
        raise SourceNotFoundError(f"cannot get {repo_id}", hint) from None
    except (HfHubHTTPError, OSError) as e:
        raise SourceNotFoundError(f"cannot download {repo_id}: {e}".splitlines()[0],
                                  "check the network or pass a local folder") from None
    return Path(folder)
