"""Every error leaves the server as OpenAI's envelope {"error": {message, type, param, code}}.

Client mistakes are 4xx (never 5xx: the SDKs retry 5xx). FastAPI's 422 becomes 400.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm4.api.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

STATUS_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
    429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable",
}


class APIError(Exception):
    """Raise anywhere below a route; the handler turns it into the envelope with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.type = type or STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.detail()).model_dump(), status_code=self.status,
                            headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()


def describe_errors(errors) -> tuple[str, str | None]:
    """One readable sentence and the offending parameter from pydantic's error list."""
    errors = list(errors)
    if not errors:
        return "invalid request", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        message, param = describe_errors(exc.errors())
        return APIError(400, message, param=param, code="invalid_value" if param else "invalid_json").response()

    @app.exception_handler(json.JSONDecodeError)
    async def json_error(_: Request, exc: json.JSONDecodeError):
        return APIError(400, f"the request body is not valid JSON: {exc.msg}", code="invalid_json").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "…"  # no echo of 100 KB
        if exc.status_code == 404:
            message = f"no route {request.method} {path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {path}"
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        log.exception("unhandled error")  # the message is logged, never sent: it may hold internals
        return APIError(500, "internal server error", type="internal_server_error").response()
