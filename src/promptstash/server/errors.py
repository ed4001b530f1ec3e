"""API errors, rendered in the format of the route that raised them.

    OpenAI:    {"error": {"message", "type", "param", "code"}}
    Anthropic: {"type": "error", "error": {"type", "message"}}
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# HTTP status -> (OpenAI type, Anthropic type)
_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("invalid_request_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
    529: ("server_error", "overloaded_error"),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(error: APIError, anthropic: bool) -> dict[str, Any]:
    openai_type, anthropic_type = _TYPES.get(error.status, ("server_error", "api_error"))
    if anthropic:
        return {"type": "error", "error": {"type": anthropic_type, "message": error.message}}
    return {"error": {"message": error.message, "type": openai_type, "param": error.param, "code": error.code}}


def error_response(error: APIError, path: str) -> JSONResponse:
    headers = {"retry-after": "1"} if error.status in (429, 503, 529) else {}
    if error.status == 413:  # the unread rest of the body is not drained: the connection ends with the answer
        headers["connection"] = "close"
    return JSONResponse(error_body(error, is_anthropic_path(path)), status_code=error.status, headers=headers)
