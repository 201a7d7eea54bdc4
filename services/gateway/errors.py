"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every refusal the gateway makes is an `APIError` raised where the problem is found; the app
turns it into a JSON response with its status. Knows nothing of FastAPI's routing.
"""

from __future__ import annotations

from typing import Any

import grpc

INVALID_REQUEST = "invalid_request_error"

# Every error body, as OpenAPI's `components.schemas.Error`.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string", "minLength": 1},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


class APIError(Exception):
    """A request refused with an HTTP status and a message that says what to change."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(message: str, param: str = "messages") -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist; this server serves {served!r}",
        param="model",
        code="model_not_found",
    )


def queue_full(retry_after_s: int) -> APIError:
    return APIError(
        429,
        "the server is at capacity and its queue is full: retry after "
        f"{retry_after_s} s or send fewer concurrent requests",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="service_unavailable")


# What the attention instance's engine says when prompt and output exceed the context.
_CONTEXT_MARKERS = ("tokens including the output", "context length", "too long")


def from_rpc_error(err: grpc.RpcError) -> APIError:
    """An attention instance's refusal, as the HTTP client should see it."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if any(marker in details for marker in _CONTEXT_MARKERS):
            return context_length_exceeded(details)
        return invalid(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return unavailable(f"the attention instance is unavailable: {details}; retry")
    return APIError(
        500, f"the attention instance failed: {details}", type="server_error", code="internal"
    )
