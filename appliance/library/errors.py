"""What can go wrong in a pull or a removal, each with its HTTP status and a hint for the CLI."""

from __future__ import annotations

from appliance.errors import ApplianceError

OFFLINE_HINT = ("check the network, or pull a local file instead (appliance pull ./model.gguf); "
                "HF_ENDPOINT picks another hub or mirror")
TOKEN_HINT = ("accept the model's licence on its hub page, then set HF_TOKEN (or run "
              "`hf auth login`) where the pull runs")


class LibraryError(ApplianceError):
    """Base: a library failure with a one-line `hint` saying what to do."""

    status = 400
    type = "invalid_request_error"
    code = "library_error"

    def __init__(self, message: str, hint: str = "", param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.hint = hint


class BadReference(LibraryError):
    """The REF (or id) is not a hub repo id, a usable local path or a known model."""

    code = "invalid_value"


class RepoNotFound(LibraryError):
    """The hub has no such repository, revision or quantization."""

    status = 404
    code = "not_found"


class GatedRepo(LibraryError):
    """The hub wants a token (gated or private repository)."""

    status = 403
    type = "permission_error"
    code = "gated_repo"


class HubUnreachable(LibraryError):
    """The hub cannot be reached (network, DNS, offline mode)."""

    status = 502
    type = "server_error"
    code = "hub_unreachable"


class BadHubAnswer(LibraryError):
    """The hub (or a mirror) answered with metadata we cannot trust."""

    status = 502
    type = "server_error"
    code = "bad_hub_answer"


class NotEnoughSpace(LibraryError):
    """The models folder's disk cannot hold what the pull needs."""

    status = 507
    type = "server_error"
    code = "insufficient_storage"


class IntegrityError(LibraryError):
    """A downloaded file does not match the hub's sha256; it was deleted."""

    status = 502
    type = "server_error"
    code = "integrity_error"


class ModelExists(LibraryError):
    """A different model with that id is already installed."""

    status = 409
    code = "model_exists"


class ModelInUse(LibraryError):
    """The model is loaded; removing it needs --force (which unloads it first)."""

    status = 409
    code = "model_in_use"


class PullFailed(LibraryError):
    """A stage after the download failed (conversion, quantization, a local import)."""

    status = 500
    type = "server_error"
    code = "pull_failed"
