"""What every route shares: the engine, the flags, the metrics, and the per-request tracker that feeds them."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from jaxllm.args import ServerArgs
from jaxllm.server.generation import Generation


@dataclasses.dataclass
class ServerState:
    engine: Any  # jaxllm.engine.engine.Engine
    args: ServerArgs
    metrics: Any = None  # jaxllm.metrics.Metrics, or None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        """The name /v1/models lists: the model directory's base name."""
        return os.path.basename(os.path.normpath(self.args.model_dir or "model"))

    def is_eos(self, token_id: int) -> bool:
        return token_id in self.args.eos_id

    def refresh_load(self) -> None:
        """Copy the engine's load (waiting, running, paused requests; estimated peak tokens) into the gauges."""
        s = self.engine.stats()
        peak = s["token_load"]["dynamic_max_load"] * self.args.max_total_token_num
        self.metrics.set_load(queue_size=s["waiting"], running=s["running"], paused=s["paused"],
                              max_tokens=round(peak))

    def track(self) -> "Tracker":
        """Start the clock of one generation request (counted as received in the metrics)."""
        if self.metrics is not None:
            self.metrics.request_received()
        return Tracker(self.metrics)


class Tracker:
    """One generation request from arrival to answer: set `ok` when it succeeded, call end() once it is over."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self.received_at = time.monotonic()
        self.generation: Generation | None = None
        self.ok = False
        self._ended = False

    def start(self, generation: Generation) -> Generation:
        """The request passed validation and is about to reach the engine."""
        self.generation = generation
        return generation

    def end(self) -> None:
        if self._ended or self.metrics is None:
            self._ended = True
            return
        self._ended = True
        now = time.monotonic()
        g = self.generation
        submitted = g.submitted_at if g is not None and g.submitted_at is not None else now
        first = g.first_token_at if g is not None and g.first_token_at is not None else now
        last = g.finished_at if g is not None and g.finished_at is not None else now
        self.metrics.request_finished(
            success=self.ok,
            duration_s=now - self.received_at,
            validation_s=submitted - self.received_at,
            inference_s=last - submitted,
            queue_s=first - submitted,
            first_token_s=first - self.received_at,
            input_len=g.input_len if g is not None else 0,
            generated_tokens=g.generated_tokens if g is not None else 0,
            max_new_tokens=g.params.max_new_tokens if g is not None else 0,
        )
