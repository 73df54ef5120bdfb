"""What an engine step reports to its listeners (the metrics) once its results are read."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One step, as step listeners (Engine.add_step_listener) see it once its results are read."""

    method: str  # "prefill" when the step computed any prefill chunk, else "decode"
    duration_s: float  # from its preparation to its results on the host
    prefill_requests: int
    decode_requests: int
    prefill_tokens: int
    decode_tokens: int

    @property
    def batch_size(self) -> int:
        """The metrics' batch size: the prefilled requests of a prefill step, the decoded ones otherwise."""
        return self.prefill_requests if self.method == "prefill" else self.decode_requests
