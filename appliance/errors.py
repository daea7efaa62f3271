"""Domain errors. One handler (appliance/api/errors.py) turns each into OpenAI-shaped JSON."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base: an error with an HTTP status and an OpenAI error type."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidRequest(ApplianceError):
    """A bad parameter or an unusable request body."""

    status = 400
    type = "invalid_request_error"


class InvalidValue(InvalidRequest):
    """A field's value is out of bounds or malformed; `param` names the field."""

    code = "invalid_value"


class ContextOverflow(InvalidRequest):
    """The prompt does not fit in the model's context."""

    code = "context_length_exceeded"


class Unauthorized(ApplianceError):
    """A key is configured and the request's bearer key is missing or wrong."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(ApplianceError):
    """No model with that id or alias."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ModelUnusable(ApplianceError):
    """The model file exists but cannot be loaded (corrupt, unsupported)."""

    status = 422
    type = "invalid_request_error"
    code = "model_unusable"


class PayloadTooLarge(ApplianceError):
    """The request body is over the configured limit."""

    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class ServiceUnavailable(ApplianceError):
    """Loading, switching or over capacity: try again after `retry_after` seconds."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


class QueueFull(ServiceUnavailable):
    """Every slot is busy and the waiting queue is at its bound."""

    code = "queue_full"


class LoadFailed(ApplianceError):
    """llama.cpp could not load the model (memory, corrupt file)."""

    status = 500
    type = "server_error"
    code = "model_load_failed"


class EngineError(ApplianceError):
    """The engine failed on this request: a bug, reported as 500 while the daemon keeps serving."""

    status = 500
    type = "server_error"
    code = "engine_error"


class WorkerUnavailable(ServiceUnavailable):
    """An RPC worker in `rpc_workers` does not answer (or cannot serve); the message names it."""

    code = "rpc_worker_unavailable"


class UpstreamUnavailable(ServiceUnavailable):
    """An upstream server cannot be reached (refused, DNS, reset before answering)."""

    code = "upstream_unavailable"


class UpstreamBadAnswer(ApplianceError):
    """An upstream answered with something we cannot pass on (too large, not JSON, a redirect,
    our key refused, a stream broken off)."""

    status = 502
    type = "server_error"
    code = "bad_gateway"


class UpstreamTimeout(ApplianceError):
    """An upstream did not answer within its timeout_s."""

    status = 504
    type = "server_error"
    code = "upstream_timeout"


class UpstreamAnswered(ApplianceError):
    """An upstream refused a request translated from another dialect; its status is kept."""

    code = "upstream_error"

    def __init__(self, message: str, status: int, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, param, retry_after)
        self.status = status if 400 <= status < 600 else 502
        self.type = "invalid_request_error" if self.status < 500 else "server_error"
