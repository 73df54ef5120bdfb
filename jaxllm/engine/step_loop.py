"""The engine thread's loop (the Engine's half that schedules and dispatches): schedule → prepare step N+1 →
read step N and postprocess it (`StepReader`), while a launch thread enqueues step N+1 on the device. A step
with constrained rows gets its sampler just before the next step's launch; the grammar rows of the masks it
needs are asked of the mask worker process (jaxllm.engine.mask_client) the moment the tokens before them are
read, so their build overlaps both the device's model and the engine thread's own work (postprocess,
scheduling, preparing the next step); the engine thread waits for them only right before the sampler.

Looking ahead: when the step about to launch decodes every request that can decode (and holds only plain
requests), the step after it is scheduled and its inputs sent to the device before it launches, and the oldest
launched step's results may stay unread for one more iteration (MAX_UNREAD): a step is then scheduled while the
three steps before it are unread, and a request that ends (eos, a stop string) is found up to two steps late,
its rows in the steps after discarded. A host-to-device copy waits on the device's stream behind every step
enqueued before it, and the GPU client launches a step only once its inputs are on the device; sent after step
N's launch, step N+1's inputs would hold its launch until step N had finished, and the device would idle while
N+1 is enqueued (docs/perf.md, session 17)."""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

from jaxllm.engine.constraints import StepMasks, release_constraint
from jaxllm.engine.events import final_event
from jaxllm.engine.request import RequestStatus
from jaxllm.engine.runner import PreparedStep, StepHandle
from jaxllm.engine.scheduler import SchedulerOutput
from jaxllm.thread_names import name_os_thread

log = logging.getLogger("jaxllm.engine.engine")

# Looking ahead, how many launched steps may wait unread while the next launches: two keeps two steps queued on the
# device behind the one running, so a step's host chain (scheduling, the jitted call, XLA's command-buffer update
# and launch on its dispatch thread) has two device steps to finish in, not one (docs/perf.md, session 18).
MAX_UNREAD = 2
# A prefill admitted while other requests decode is looked past too: the decode after it is prepared, and its
# inputs sent, before it launches (otherwise they are sent after, queue behind it on the device, and the decode
# launches only once the prefill has finished: the device idles for a launch after each admission round).
LOOK_AHEAD_PAST_PREFILLS = True


class PhaseClock:
    """Wall and thread-CPU seconds since it was made, for a host phase's two counters (NAME_s, NAME_cpu_s): where
    other work shares the cores (a loaded machine; the CPU backend's device work) wall time includes waits for a
    core, which the engine thread's CPU time leaves out."""

    __slots__ = ("wall", "cpu")

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.thread_time()

    def add_to(self, counters: dict, phase: str, less_wall: float = 0.0) -> None:
        """Add the time since made to counters[phase + "_s"] (less `less_wall`: a wait) and [phase + "_cpu_s"]."""
        counters[f"{phase}_s"] += time.perf_counter() - self.wall - less_wall
        counters[f"{phase}_cpu_s"] += time.thread_time() - self.cpu


class StepLoop:
    """The Engine's loop methods (a mixin: they use its scheduler, runner, inbox, counters and requests)."""

    _early_masks: tuple[Future, StepMasks] | None = None  # (a launch, the masks of the step it launches)
    _launching_batch: SchedulerOutput | None = None  # the batch of self._launching
    _launching_after: str | None = None  # the kind of the step launched before it ("prefill", "decode")
    _launching_ahead: bool = False  # self._launching was prepared before the step ahead of it launched
    IDLE_LAUNCHES_KEPT = 64  # the most recent idle launches idle_launches() describes

    def idle_launches(self) -> list[dict]:
        """The latest steps launched on an idle device (by either count of `steps_after_idle`,
        `steps_idle_by_enqueue`), oldest first: step number, kind, rows, the kind of the step before, whether it
        was prepared looking ahead, and which count took it. For finding what the idle launches have in common."""
        return list(self._idle_launches)

    # --- the loop (engine thread) --------------------------------------------------------------
    def _loop(self) -> None:
        unread: collections.deque[StepHandle] = collections.deque()  # launched, results not read: oldest first
        ready: PreparedStep | None = None  # scheduled, prepared and its inputs sent, not launched (looking ahead)
        # The jitted call enqueues a step's kernels with the GIL released: on its own thread it overlaps the
        # reading of the previous step's results.
        launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-launch",
                                      initializer=name_os_thread)
        try:
            while True:
                started = PhaseClock()
                self._take_inbox()
                if self._stopping:
                    break
                launching = None
                if self._images is not None and self._images.has_work():
                    self._advance_images()
                ahead = ready is not None  # prepared while the step before it launched
                if ready is None:
                    ready = self._schedule_step()
                past_prefill = False  # `ready` (after this launch) was looked ahead past a prefill
                if ready is not None:
                    following = self._schedule_step() if self._may_look_ahead(ready) else None
                    past_prefill = following is not None and not ready.batch.decodes_all
                    launching = self._start_dispatch(ready, launcher, unread[-1] if unread else None, ahead)
                    ready = following
                # Looking ahead, the oldest steps' results may wait (up to MAX_UNREAD steps unread); otherwise every
                # step before the one launched is read now, so a step scheduled afresh finds each request's tokens
                # on the host or sampled by the last launched step.
                while len(unread) >= (MAX_UNREAD if ready is not None else 1):
                    self._postprocess(unread.popleft())
                launched = self._finish_dispatch(*launching) if launching else None
                if launched is not None:
                    unread.append(launched)
                else:  # nothing launched, or its launch failed: the device holds no token a next step may take
                    while unread:
                        self._postprocess(unread.popleft())
                if ready is not None and launched is None:  # the step launched before it failed
                    if past_prefill:  # a prefill: the decode goes on without its requests
                        ready = self._decode_without_failed(ready)
                    else:  # so does it
                        self._unpend(ready.batch)
                        self._fail_step(ready.batch, RuntimeError("the step launched before it failed"))
                        ready = None
                if launched is not None and launched.unsampled is not None:  # its rows' tokens so far are read
                    early = self._early_masks
                    launched.masks = (early[1] if early is not None and early[0] is launching[1]
                                      else StepMasks(launched.batch))
                self._early_masks = None
                if self._grammars is not None:
                    self._counters["mask_wait_s"] += self._grammars.take_answer_s()
                started.add_to(self._counters, "host")  # before the snapshot: it reports the whole iteration
                self._snapshot = self._take_snapshot()
                if self._sink is not None:
                    self._sink.flush(self._snapshot)
                if not unread:
                    idle = not self.scheduler.has_work() and not (self._images and self._images.has_work())
                    if idle:
                        self._idle.set()
                        if self._idle_since is None:
                            self._idle_since = time.monotonic()
                    self._wake.wait(timeout=1.0 if idle else 0.001)
                    self._wake.clear()
            while unread:
                self._postprocess(unread.popleft())
        finally:
            launcher.shutdown()
        if ready is not None:  # stopping: its requests end below
            self._unpend(ready.batch)
        for req in list(self._requests.values()):
            self._end(req, "abort")
        self._snapshot = self._take_snapshot()
        if self._sink is not None:
            self._sink.flush(self._snapshot)

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                taken = {id(r) for r in item if r.request_id in self._requests}
                refused = {id(m) for r in item if id(r) in taken for m in (r.group.members if r.group else [r])}
                for req in item:
                    if id(req) in refused:
                        req.status, req.finish_reason = RequestStatus.FINISHED, "error"
                        release_constraint(req)
                        self._emit(req, final_event(req, "error", f"request id {req.request_id} is in use"))
                        continue
                    self._requests[req.request_id] = req
                    if req.images:
                        self._images.add(req)
                    else:
                        self.scheduler.add(req)
            elif item in self._requests:
                self._end(self._requests[item], "abort")

    def _advance_images(self) -> None:
        """Requests whose images found room in the image cache (and are encoding) go to the scheduler."""
        ready, failed = self._images.advance()
        for req in ready:
            if not req.finished:
                self.scheduler.add(req)
        for req, message in failed:
            self._end(req, "error", message)

    def _schedule_step(self) -> PreparedStep | None:
        """Schedule the next step and prepare it (its inputs sent to the device); None when there is nothing to
        run or its preparation failed."""
        if not self.scheduler.has_work():
            return None
        self._idle.clear()
        self._idle_since = None
        scheduled = PhaseClock()
        batch = self.scheduler.schedule()
        scheduled.add_to(self._counters, "schedule")
        self._note_admissions(batch)
        self._counters["preemptions"] += len(batch.preempted)
        if batch.kind == "prefill" or batch.preempted:
            self._peak_at = 0.0  # the running set changed: refresh the peak estimate now
        if not batch.chunks:
            return None
        prepared = self._prepare(batch)
        if prepared is None:
            return None
        for chunk in batch.chunks:
            if chunk.samples:
                chunk.request.num_pending += 1
        return prepared

    def _may_look_ahead(self, step: PreparedStep) -> bool:
        """Whether the step after `step` may be scheduled before `step` launches: when `step` holds every
        request that can decode (so each decode of the next step takes its token from it), or is a prefill that
        keeps the other requests' tokens where the steps before left them on the device (`step.carried`:
        StepInputBuilder.carry_base), and only plain requests (a constrained, beam-searching, healing or image
        request needs the host to read its results first; sampled groups' members decode as any request). Not
        across processes: they launch in step."""
        batch = step.batch
        carries = step.carried and LOOK_AHEAD_PAST_PREFILLS
        if not (batch.decodes_all or carries) or step.shape.constrained or step.staged is None:
            return False
        requests = [c.request for c in batch.chunks]
        if not batch.decodes_all:  # the next step also decodes the requests running beside it
            requests += self.scheduler.running
        return all(r.constraint is None and r.healing is None and not r.images
                   and (r.group is None or r.group.beam is None) for r in requests)

    def _prepare(self, batch: SchedulerOutput, pending: bool = False) -> PreparedStep | None:
        """A scheduled step prepared and its inputs sent to the device; None (the step failed: its requests end)
        when that raised. `pending`: its rows' tokens were counted as on their way (`_unpend` before they end)."""
        started = PhaseClock()
        try:
            prepared = self.runner.prepare(batch)
            if self.runner.peers is None:  # (the other processes of a deployment stage their inputs at launch)
                self.runner.stage(prepared)
            return prepared
        except Exception as exc:  # noqa: BLE001 - a failed step must not stop the engine
            if pending:
                self._unpend(batch)
            self._fail_step(batch, exc)
            return None
        finally:
            started.add_to(self._counters, "dispatch")

    def _decode_without_failed(self, step: PreparedStep) -> PreparedStep | None:
        """The decode prepared past a prefill whose launch failed, again without the failed requests (ended by
        then): the others' tokens are still on the device, where the steps before the prefill left them. None
        when none is left running (a failure that consumed the device state paused them, to be recomputed)."""
        self.runner.inputs.unlaunch()
        batch = step.batch
        kept = [c for c in batch.chunks if c.request.status is RequestStatus.RUNNING]
        self._unpend(dataclasses.replace(batch, chunks=[c for c in batch.chunks
                                                        if c.request.status is not RequestStatus.RUNNING]))
        if not kept:
            return None
        batch = dataclasses.replace(batch, chunks=kept, fills=[f for f in batch.fills if
                                                               f.request.status is RequestStatus.RUNNING])
        return self._prepare(batch, pending=True)

    def _unpend(self, batch: SchedulerOutput) -> None:
        """A step that will never give results (not launched, or failed): its rows' tokens are no longer on their
        way."""
        for chunk in batch.chunks:
            if chunk.samples:
                chunk.request.num_pending -= 1

    def _start_dispatch(self, prepared: PreparedStep, launcher: ThreadPoolExecutor, unread: StepHandle | None,
                        ahead: bool = False):
        """Launch a prepared step on `launcher` (`unread`: the step in flight before it; `ahead`: `prepared` was
        prepared looking ahead); returns (batch, the launch's future) for _finish_dispatch."""
        if unread is not None and unread.unsampled is not None:
            self._sample_constrained(unread)  # before this launch: its inputs are that step's tokens
        self._launching = launcher.submit(self.runner.launch, prepared, unread)
        self._launching_batch = prepared.batch
        self._launching_after = None if unread is None else unread.batch.kind
        self._launching_ahead = ahead
        return prepared.batch, self._launching

    def _finish_dispatch(self, batch: SchedulerOutput, launch: Future) -> StepHandle | None:
        """Wait for the launch begun by _start_dispatch: the step is on the device (its handle), or failed."""
        started = PhaseClock()
        try:
            handle = launch.result()
        except Exception as exc:  # noqa: BLE001
            self._launching = None
            self._unpend(batch)
            self._fail_step(batch, exc)
            return None
        finally:
            started.add_to(self._counters, "dispatch")
        self._launching = None
        self._counters["launch_s"] += handle.launch_s
        self._counters["launch_cpu_s"] += handle.launch_cpu_s
        self._counters["steps_after_idle"] += handle.after_idle
        self._counters["steps_after_idle_after_prefill"] += handle.after_idle and self._launching_after == "prefill"
        self._counters["steps_idle_by_enqueue"] += handle.idle_by_enqueue
        self._counters["steps_idle_by_enqueue_after_prefill"] += (handle.idle_by_enqueue
                                                                  and self._launching_after == "prefill")
        if handle.after_idle or handle.idle_by_enqueue:
            self._idle_launches.append({
                "step": self._counters["steps"], "kind": batch.kind, "rows": len(batch.chunks),
                "after": self._launching_after, "looked_ahead": self._launching_ahead,
                "counted": "at the call" if handle.after_idle else "by the enqueue's end"})
        self.scheduler.step_dispatched(batch)
        c = self._counters
        c["steps"] += 1
        c[f"{batch.kind}_steps"] += 1
        c["prefill_tokens"] += batch.num_prefill_tokens
        c["decode_tokens"] += batch.num_decode_tokens
        return handle

    def _start_masks(self) -> None:
        """The constraints have taken the tokens read so far: start building the masks of the step being
        launched (its grammar rows are asked of the mask worker now)."""
        if self._launching is not None:
            self._early_masks = (self._launching, StepMasks(self._launching_batch))

    def _sample_constrained(self, handle: StepHandle) -> None:
        """Enqueue the sampler of a constrained step whose model is on the device, with its masks (asked of the
        mask worker since its tokens so far were read). Called as late as possible (once the next step is
        prepared, or before the step's results are read). A row whose rule failed (the mask worker died) ends
        its request; the step goes on."""
        masks = handle.masks if handle.masks is not None else StepMasks(handle.batch)
        handle.masks = None
        try:
            mask, failed = masks.result(handle.rows, self.runner.mask_words)
            self._counters["mask_s"] += masks.build_s
            self._counters["constrained_steps"] += 1
            for i, message in failed:
                req = handle.batch.chunks[i].request
                if not req.finished:
                    self._end(req, "error", message)
            self.runner.sample_constrained(handle, mask)
        except Exception as exc:  # noqa: BLE001 - a failed step must not stop the engine
            handle.failure = exc

    def _note_admissions(self, batch: SchedulerOutput) -> None:
        """Queue time and prompt-cache hits of requests scheduled for the first time."""
        if batch.kind == "decode":  # every request in it was scheduled before
            return
        now = time.monotonic()
        for chunk in batch.chunks:
            req = chunk.request
            if req.scheduled_at is None:
                req.scheduled_at = now
                if "prompt_cache_query_tokens" in self._counters:
                    self._counters["prompt_cache_hit_tokens"] += req.cache_hit or 0
                    self._counters["prompt_cache_query_tokens"] += req.prompt_len


    def _fail_step(self, batch: SchedulerOutput, exc: Exception) -> None:
        """A step failed: its requests end with an error; if the device state was consumed, the other
        running requests are paused (recomputed later) on fresh buffers."""
        log.error("step failed (%s: %s); failing its %d requests", type(exc).__name__, exc, len(batch.chunks),
                  exc_info=exc)
        self._counters["failed_steps"] += 1
        message = f"{type(exc).__name__}: {exc}"
        if self._launching is not None:  # the next step's launch is under way: the device state is its
            wait([self._launching])
        for chunk in batch.chunks:
            if not chunk.request.finished:
                self._end(chunk.request, "error", message)
        if self.runner.device_state_lost():  # every KV is gone, the prompt cache's too
            self.runner.reset_device_state()
            self._counters["preemptions"] += len(self.scheduler.pause_all())
