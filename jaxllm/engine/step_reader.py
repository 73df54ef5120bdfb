"""Reading a step's results on the engine thread (the Engine's half that postprocesses): append each sampled
token, check stops, score reward prompts, advance beam searches, report the step to listeners. Postprocess is
the only place a token is appended, a stop checked and KV freed."""

from __future__ import annotations

import logging
import time

from jaxllm.engine.beam import reassignments
from jaxllm.engine.constraints import start_advances
from jaxllm.engine.group import SequenceGroup
from jaxllm.engine.request import Request
from jaxllm.engine.runner import StepHandle
from jaxllm.engine.scheduler import SchedulerOutput
from jaxllm.engine.step_loop import PhaseClock
from jaxllm.engine.step_report import StepReport
from jaxllm.engine.stream import WakeBatch

log = logging.getLogger("jaxllm.engine.engine")


class StepReader:
    """The Engine's postprocessing methods (a mixin: they use its scheduler, counters, events and streams)."""

    def _postprocess(self, handle: StepHandle) -> None:
        """Read a step's results: append tokens, check stops, free what finished."""
        batch = handle.batch
        if handle.unsampled is not None:  # a constrained step whose sampler no later step has enqueued yet
            self._sample_constrained(handle)
        started, failure = PhaseClock(), None
        try:
            if handle.failure is not None:
                raise handle.failure
            result = self.runner.fetch(handle)
        except Exception as exc:  # noqa: BLE001
            failure = exc
        waited = time.perf_counter() - started.wall
        self._counters["device_wait_s"] += waited
        self._counters["host_s"] -= waited
        if failure is not None:
            self._unpend(batch)
            self._fail_step(batch, failure)
            return
        self._report_step(batch, time.perf_counter() - handle.dispatched_at)
        self._wakes, self._finals = WakeBatch(), []
        try:
            self._read_results(batch, result)
        finally:
            self._emit_finals()
            orphaned, self._wakes = self._wakes.send(), None
        for request_id in orphaned:  # their consumers' event loops are gone
            if request_id in self._requests:
                self._end(self._requests[request_id], "abort")
        started.add_to(self._counters, "postprocess", less_wall=waited)

    def _read_results(self, batch: SchedulerOutput, result) -> None:
        if result.scores is not None:
            self._read_scores(batch, result.scores)
            return
        rows = range(len(batch.chunks))
        if batch.kind == "decode" and self._sink is not None:
            rows = self._read_plain(batch, result)
        sampled, logprobs = result.sampled.tolist(), result.logprobs.tolist()  # Python ints and floats
        advanced = self._advance_constraints(batch, sampled, rows)
        beams: dict[int, SequenceGroup] = {}
        for i in rows:
            chunk = batch.chunks[i]
            req = chunk.request
            if chunk.samples:
                req.num_pending -= 1
            if req.finished:
                continue
            try:
                if chunk.prompt_logprobs:
                    offset = result.token_offsets[i]
                    self._events.add_prompt_logprobs(req, chunk.start, chunk.num_tokens,
                                                     *(a[offset:] for a in result.prompt_logprobs))
                if not chunk.samples:
                    continue
                if req.group is not None and req.group.beam is not None:
                    req.group.beam.record(req, result.top_ids[i], result.top_logprobs[i])
                    beams[id(req.group)] = req.group
                    continue
                top = None
                if req.params.top_logprobs:
                    top = list(zip(result.top_ids[i].tolist(), result.top_logprobs[i].tolist()))
                self._append_token(req, sampled[i], logprobs[i], top, i in advanced)
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer error: fail this request only
                log.exception("request %s failed in postprocess", req.request_id)
                self._end(req, "error", f"{type(exc).__name__}: {exc}")
        for group in beams.values():
            try:
                self._advance_beams(group)
            except Exception as exc:  # noqa: BLE001
                log.exception("beam search of %s failed", group.leader.request_id)
                self._end(group.leader, "error", f"{type(exc).__name__}: {exc}")

    def _read_plain(self, batch: SchedulerOutput, result) -> list[int]:
        """In the engine core, a decode step's rows whose events are plain go straight into the sink's columns
        (EventMaker.plain_tokens); returns the other rows, for the general path."""
        reqs = [chunk.request for chunk in batch.chunks]
        taken, *columns = self._events.plain_tokens(reqs, result.sampled, result.logprobs)
        plain = [req for req, took in zip(reqs, taken) if took]
        for req in plain:
            req.num_pending -= 1
        self._sink.add_plain([req.stream.handle for req in plain], *columns)
        return [i for i, took in enumerate(taken) if not took]

    def _read_scores(self, batch: SchedulerOutput, scores) -> None:
        """A reward model's step: each request whose prompt it completed gets its score and ends."""
        for i, chunk in enumerate(batch.chunks):
            req = chunk.request
            if not chunk.samples:
                continue
            req.num_pending -= 1
            if not req.finished:
                self._retire(req, "stop")
                self._emit(req, self._events.score(req, scores[i].tolist()))

    def _advance_beams(self, group: SequenceGroup) -> None:
        """One round of a group's beam search, once every live beam's results are read: move the beams (each
        member continues from its new parent's KV, shared by reference), or hand out the results, best first."""
        live = [m for m in group.members[: group.beam.live] if not m.finished]
        if not live or not group.beam.ready(live):
            return
        decided = group.beam.advance(live)
        if decided.done:
            for member, hypothesis in zip(group.members, group.beam.results()):
                self._events.attach(member)  # fresh output and text state
                for token, logprob in zip(hypothesis.tokens, hypothesis.logprobs):
                    self._append_token(member, token, logprob)
            for member in group.members:  # no hypothesis left for it (a vocabulary smaller than 2 × width)
                self._end(member, "stop")
            return
        moves = reassignments(group.members, decided.continuations)
        self.scheduler.reassign([(m.member, m.slots) for m in moves])
        for move in moves:
            move.member.output_ids, move.member.output_logprobs = move.output_ids, move.output_logprobs

    def _report_step(self, batch: SchedulerOutput, duration_s: float) -> None:
        if not self._step_listeners:
            return
        decodes = batch.num_decode_tokens
        report = StepReport(
            method="prefill" if batch.num_prefill_tokens else "decode", duration_s=duration_s,
            prefill_requests=len(batch.chunks) - decodes, decode_requests=decodes,
            prefill_tokens=batch.num_prefill_tokens, decode_tokens=decodes,
        )
        for listener in self._step_listeners:
            try:
                listener(report)
            except Exception:  # noqa: BLE001 - a listener must not stop the engine
                log.exception("step listener %r failed", listener)

    def _advance_constraints(self, batch: SchedulerOutput, sampled: list[int], rows) -> set[int]:
        """Constrained rows (among `rows`, the indices of the chunks left to read) take their tokens first: the
        grammar rows' tokens go to the mask worker at once, with the request for the masks of the step being
        launched, and only then are the answers awaited (the worker builds those masks while the rest of the
        step is read). Returns the rows whose constraints took their token; a request whose constraint refused
        its token fails here."""
        taking = []
        for i in rows:
            chunk = batch.chunks[i]
            req = chunk.request
            constraint = req.constraint
            if (constraint is None or not chunk.samples or req.finished or not constraint.active
                    or (req.group is not None and req.group.beam is not None)):
                continue
            taking.append(i)
        if not taking:
            return set()
        answers = start_advances([(batch.chunks[i].request.constraint, sampled[i]) for i in taking])
        self._start_masks()
        advanced = set()
        for i, error in zip(taking, answers()):
            if error is None:
                advanced.add(i)
                continue
            req = batch.chunks[i].request
            log.error("request %s failed in postprocess: %s", req.request_id, error)
            self._end(req, "error", f"ValueError: {error}")
        return advanced

    def _append_token(self, req: Request, token: int, logprob: float, top=None, advanced: bool = False) -> None:
        event = self._events.token(req, token, logprob, top, advanced)
        if not event.finished:
            self._emit(req, event)
            return
        self._retire(req, event.finish_reason, snapshot=False)
        self._finals.append((req, event))

    def _emit_finals(self) -> None:
        """The final events of the requests a step's tokens finished, once the stats snapshot shows them gone (one
        snapshot per step, not one per finished request)."""
        finals, self._finals = self._finals, None
        if finals:
            self._snapshot = self._take_snapshot()
            for req, event in finals:
                self._emit(req, event)
