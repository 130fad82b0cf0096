"""Every failure leaves the server as OpenAI's error shape {"error": {message, type, param, code}},
so OpenAI clients raise their usual typed exceptions (BadRequestError, NotFoundError, ...)."""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngineDeadError, LowbitError

log = logging.getLogger("lowbit.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """Raised by handlers to answer with a given status and OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    etype = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def exception_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message) of an exception raised while serving: an APIError as it says, a dead
    engine 503, any other LowbitError (bad input the engine refused) 400, anything else 500."""
    if isinstance(exc, APIError):
        return exc.status, exc.message
    if isinstance(exc, EngineDeadError):
        return 503, str(exc)
    if isinstance(exc, LowbitError):
        return 400, str(exc)
    return 500, f"internal server error ({type(exc).__name__})"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's error list, plus the offending parameter name."""
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    raw_loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if e.get("type") in ("missing", "model_attributes_type") and not raw_loc:
        return "request body must be a JSON object", None
    # pydantic names the union member it tried (`str`, `list[int]`, ...): not a field, drop it
    loc = [x for x in raw_loc if not _is_union_tag(x)]
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    if len(loc) < len(raw_loc):
        msg = f"invalid type or value ({msg}, or one of the other accepted types)"
    param = ".".join(loc) or None
    return (f"{param}: {msg}" if param else msg), param


def _is_union_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "none", "dict") or "[" in part or part[:1].isupper()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(LowbitError)  # EngineDeadError (503) included
    async def _lowbit_error(_: Request, exc: LowbitError) -> JSONResponse:
        return error_response(*exception_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = validation_message(exc)
        return error_response(400, msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "error"
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
        return error_response(exc.status_code, detail)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error while serving a request")
        return error_response(*exception_status(exc))
