"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every failure the server answers, from a malformed body to an unknown route to a crash, goes through
``error_response`` so clients see one format. A 500 never carries internals (the traceback goes to the log).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.errors import CapacityError, EngineError, RequestError

log = logging.getLogger("longserve.server")

# HTTP status -> OpenAI error type (the Python client maps the status to its exception class).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to send to the client as it is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_exception(exc: BaseException) -> APIError:
    """The APIError a request failure maps to (engine errors included)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, CapacityError):
        return APIError(503, str(exc), code="server_overloaded")
    if isinstance(exc, EngineError):  # the engine stopped or is shutting down: retrying elsewhere may work
        return APIError(503, str(exc), code="engine_unavailable")
    log.error("internal error", exc_info=exc)
    return APIError(500, "The server had an internal error while processing the request.", code="internal_error")


def error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
    if error.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _location(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role' (the 'body' prefix FastAPI adds is dropped)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(errors: list[dict]) -> APIError:
    """One-line 400 from pydantic's error list: the first problems, each with its field."""
    parts = []
    for e in errors[:3]:
        where = _location(tuple(e.get("loc", ())))
        msg = e.get("msg", "invalid value")
        parts.append(f"{where}: {msg}" if where else msg)
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    first = _location(tuple(errors[0].get("loc", ()))) if errors else None
    param = first.split(".")[0].split("[")[0] if first else None
    return APIError(400, "; ".join(parts) or "invalid request", param=param or None)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return error_response(from_exception(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"Unknown route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(APIError(exc.status_code, message), exc.headers)  # 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return error_response(from_exception(exc))
