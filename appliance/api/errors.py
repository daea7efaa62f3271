"""The one place where errors become HTTP responses. OpenAI's shape is the default:
`{"error": {"message", "type", "param", "code"}}`; a dialect registers its own shape for its
paths (`ErrorShapes.add`), so its clients raise their own exception types.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# (status, message, OpenAI error type, param, code) -> the JSON body
ErrorShape = Callable[[int, str, str, "str | None", "str | None"], dict]


def openai_shape(status: int, message: str, type_: str, param: str | None,
                 code: str | None) -> dict:
    return error_body(message, type_, param, code)


class ErrorShapes:
    """Which error shape answers which paths: the longest registered prefix wins."""

    def __init__(self) -> None:
        self._shapes: list[tuple[str, ErrorShape]] = []

    def add(self, prefix: str, shape: ErrorShape) -> None:
        self._shapes.append((prefix, shape))
        self._shapes.sort(key=lambda item: len(item[0]), reverse=True)

    def for_path(self, path: str) -> ErrorShape:
        return next((shape for prefix, shape in self._shapes if path.startswith(prefix)),
                    openai_shape)

    def body(self, path: str, status: int, message: str, type_: str, param: str | None = None,
             code: str | None = None) -> dict:
        return self.for_path(path)(status, message, type_, param, code)


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None, retry_after: float | None = None,
                   shape: ErrorShape = openai_shape) -> JSONResponse:
    headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after else None
    return JSONResponse(shape(status, message, type_, param, code), status_code=status,
                        headers=headers)


def from_appliance_error(e: ApplianceError, shape: ErrorShape = openai_shape) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.retry_after, shape)


def install_error_handlers(app: FastAPI, shapes: ErrorShapes) -> None:
    def shape_of(request: Request) -> ErrorShape:
        return shapes.for_path(request.url.path)

    @app.exception_handler(ApplianceError)
    async def _domain(request: Request, e: ApplianceError) -> JSONResponse:
        return from_appliance_error(e, shape_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return error_response(400, message, "invalid_request_error", param, "invalid_value",
                              shape=shape_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), kind, None, code,
                              shape=shape_of(request))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error",
                              shape=shape_of(request))
