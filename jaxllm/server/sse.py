"""Server-sent events: the `data:` framing of one JSON chunk, and the streaming reply that carries chunks,
ending a failed stream with one error event instead of a cut connection.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator, Callable

from quart import Response

from jaxllm.server.errors import ApiError
from jaxllm.server.jsonio import dump_bytes

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def event(value, *, space: bool = False) -> bytes:
    """One event: `data:` + JSON + a blank line (LightLLM writes no space after the colon; OpenAI does)."""
    return (b"data: " if space else b"data:") + dump_bytes(value) + b"\n\n"


async def _guarded(chunks: AsyncIterator[bytes], on_error: Callable[[ApiError], bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except ApiError as err:
        yield on_error(err)
    except Exception:
        log.exception("stream failed")
        yield on_error(ApiError(500, "internal error while streaming"))
    finally:
        await chunks.aclose()


def stream_response(chunks: AsyncIterator[bytes], on_error: Callable[[ApiError], bytes]) -> Response:
    """A text/event-stream reply of `chunks`, with no response timeout (streams last as long as generation)."""
    response = Response(_guarded(chunks, on_error), content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response
