"""The API's one error type (status, message, offending field) and its JSON bodies in each wire format:
LightLLM's `{"message"}`, TGI's (`message` plus the `error`/`error_type` its client reads) and OpenAI's error object.
"""

from __future__ import annotations

# OpenAI's `type` for each status we answer with.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request the server answers with `status` and a message naming the problem (and the field, if any;
    `code` is OpenAI's machine-readable error code, e.g. "invalid_api_key")."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def invalid(message: str, param: str | None = None) -> ApiError:
    """400: a value out of range, a prompt too long, a body that is not JSON."""
    return ApiError(400, message, param=param)


def bad_shape(message: str, param: str | None = None) -> ApiError:
    """422: a body of the wrong shape (missing field, unknown field, wrong type)."""
    return ApiError(422, message, param=param)


def lightllm_error_body(err: ApiError) -> dict:
    return {"message": err.message}


def tgi_error_body(err: ApiError) -> dict:
    # Hugging Face's text-generation client reads `error` (and `error_type`) from every failed reply.
    kind = "validation" if err.status < 500 else "generation"
    return {"message": err.message, "error": err.message, "error_type": kind}


def openai_error_body(err: ApiError) -> dict:
    return {
        "error": {
            "message": err.message,
            "type": _OPENAI_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "internal_error"),
            "param": err.param,
            "code": err.code,
        }
    }
