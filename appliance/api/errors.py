"""The one place where errors become HTTP responses, all OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after else None
    return JSONResponse(error_body(message, type_, param, code), status_code=status,
                        headers=headers)


def from_appliance_error(e: ApplianceError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.retry_after)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApplianceError)
    async def _domain(_: Request, e: ApplianceError) -> JSONResponse:
        return from_appliance_error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return error_response(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), kind, None, code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")
