"""One error hierarchy: every failure a client can see carries its code and HTTP status.

Errors are raised where the problem is known; `modeld.api.app` turns them into a
response in exactly one place: `{"error": {"code", "message"}}`, or OpenAI's error object
under `/v1/`. `modelctl` maps the same codes to its exit codes.
"""

from __future__ import annotations

from typing import Any, ClassVar

# OpenAI's error `type` for each HTTP status modeld answers with; anything else is a
# server_error.
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
}


class ModeldError(Exception):
    """Base of every error that reaches a client."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when there is one
        self.extra = extra  # more JSON fields for the error object (e.g. retry_after_ms)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.param is not None:
            body["param"] = self.param
        body.update(self.extra)
        return {"error": body}

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's error object, keeping modeld's code (and extras such as retry_after_ms)."""
        kind = OPENAI_ERROR_TYPES.get(self.http_status, "server_error")
        body = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": {**self.extra, **body}}

    def headers(self) -> list[tuple[str, str]]:
        """Extra response headers this error needs (Retry-After, Allow, ...)."""
        return []


class InvalidRequest(ModeldError):
    code = "invalid_request"
    http_status = 400


class BadRequest(ModeldError):
    """Bytes that are not a well-formed HTTP/1.1 request."""

    code = "bad_request"
    http_status = 400


class NotImplementedByServer(ModeldError):
    """A well-formed request using something modeld does not do (a transfer coding)."""

    code = "not_implemented"
    http_status = 501


class VersionNotSupported(ModeldError):
    """A request line naming an HTTP version other than 1.x (HTTP/2 needs its own server)."""

    code = "http_version_not_supported"
    http_status = 505


class NoDefaultModel(ModeldError):
    code = "no_default_model"
    http_status = 400


class PromptTooLong(ModeldError):
    code = "prompt_too_long"
    http_status = 400


class Forbidden(ModeldError):
    code = "forbidden"
    http_status = 403


class NotFound(ModeldError):
    code = "not_found"
    http_status = 404


class ModelNotFound(ModeldError):
    code = "model_not_found"
    http_status = 404


class MethodNotAllowed(ModeldError):
    code = "method_not_allowed"
    http_status = 405

    def __init__(self, message: str, *, allow: list[str]) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> list[tuple[str, str]]:
        return [("Allow", ", ".join(self.allow))]


class RequestTimeout(ModeldError):
    code = "request_timeout"
    http_status = 408


class PayloadTooLarge(ModeldError):
    code = "payload_too_large"
    http_status = 413


class HeadersTooLarge(ModeldError):
    code = "headers_too_large"
    http_status = 431


class Busy(ModeldError):
    """Base of the 429 answers: each carries a retry hint in ms."""

    http_status = 429

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        retry_after_ms = max(1, int(retry_after_ms))
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.retry_after_ms = retry_after_ms

    def headers(self) -> list[tuple[str, str]]:
        seconds = max(1, -(-self.retry_after_ms // 1000))  # ceil, at least 1
        return [("Retry-After", str(seconds))]


class QueueFull(Busy):
    code = "queue_full"


class QueueTimeout(Busy):
    code = "queue_timeout"


class Overloaded(Busy):
    code = "overloaded"


class ModelLoadFailed(ModeldError):
    code = "model_load_failed"
    http_status = 500


class WorkerCrashed(ModeldError):
    code = "worker_crashed"
    http_status = 500


class ModelUnloaded(ModeldError):
    """The instance was unloaded (evicted, idle, shutdown) while a request used it."""

    code = "model_unloaded"
    http_status = 503


class ShuttingDown(ModeldError):
    code = "shutting_down"
    http_status = 503


class TooManyConnections(ModeldError):
    code = "too_many_connections"
    http_status = 503


class InsufficientVram(ModeldError):
    code = "insufficient_vram"
    http_status = 507


class TemplateError(ModeldError):
    """The model's chat template cannot be compiled or rendered: the model's fault."""

    code = "template_error"
    http_status = 500


class GenerationFailed(ModeldError):
    code = "generation_failed"
    http_status = 500
