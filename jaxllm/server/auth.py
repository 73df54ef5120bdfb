"""--api_key: which routes need a key, and the check of a request's `Authorization: Bearer KEY` header
(compared in constant time; a key never appears in a reply, a repr or a log line)."""

from __future__ import annotations

import hmac
from typing import Sequence

from jaxllm.server.errors import ApiError

# Probes and scrapers call these without credentials, as with vLLM and TGI.
OPEN_ROUTES = frozenset({"/health", "/healthz", "/liveness", "/readiness", "/metrics"})


class ApiKeys:
    """The keys a request may present; with none, every request passes."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(key.encode() for key in keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"

    def refusal(self, path: str, authorization: str | None) -> ApiError | None:
        """The 401 for a request to `path` with this Authorization header, or None when it may pass."""
        if not self._keys or path in OPEN_ROUTES:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return ApiError(401, "this server needs an API key: send the header `Authorization: Bearer KEY`",
                            code="invalid_api_key")
        presented = token.strip().encode("utf-8", "surrogateescape")
        # Compare with every key, so that the time taken does not tell which key came close.
        if not sum(hmac.compare_digest(presented, key) for key in self._keys):
            return ApiError(401, "invalid API key", code="invalid_api_key")
        return None
