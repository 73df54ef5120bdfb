"""The engine: its state, lifecycle and API (callable from any thread); one background thread runs its loop
(`StepLoop`, step_loop.py: schedule, prepare and launch step N+1) and reads step N's results (`StepReader`,
step_reader.py), streaming TokenEvents to each request's consumer (asyncio or plain threads). Postprocess is
the only place a token is appended, a stop checked and KV freed.
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future

from jaxllm import heap, multiprocess
from jaxllm.engine.beam import BeamSearch
from jaxllm.engine.constraints import release_constraint
from jaxllm.engine.events import EventMaker, final_event
from jaxllm.engine.group import SequenceGroup, member_params
from jaxllm.engine.image_cache import ImageCache
from jaxllm.engine.image_stage import ImageStage
from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.mask_client import Grammars
from jaxllm.engine.loading import build_runner, build_scheduler, image_buffer, load_model
from jaxllm.thread_names import os_named
from jaxllm.weights import placed_shapes
from jaxllm.engine.prefix_cache import PrefixCache
from jaxllm.engine.request import SCORE_PARAMS, Request, RequestStatus, SamplingParams, TokenEvent
from jaxllm.engine.runner import enable_compilation_cache, warmup_from_env
from jaxllm.engine.startup import phase
from jaxllm.engine.step_loop import StepLoop
from jaxllm.engine.step_reader import StepReader
from jaxllm.engine.stream import RequestStream
from jaxllm.engine.submission import SubmitRules
from jaxllm.engine.token_healing import TokenHealer
from jaxllm.models.vision.registry import vision_family

log = logging.getLogger(__name__)

# The shapes compiled after start-up wait for this long a lull: benchmarks' pauses between runs and a client's
# between requests are shorter, so a compile rarely overlaps traffic.
QUIET_BEFORE_COMPILING_S = 10.0


class Engine(StepLoop, StepReader):
    """Continuous batching over one model: submit() from any thread or event loop, stream the tokens."""

    def __init__(self, args, model, params, mesh, tokenizer=None, *, warmup: int | None = None, peers=None,
                 sink=None, compile_later: bool = False):
        """args: ServerArgs; model/params/mesh: a built model, its weights on `mesh` (or a Future of them, still
        loading: the step shapes compile against the weights' shapes meanwhile); warmup: how many step
        shapes to compile at start-up (None: the runner's start-up set; 0: none, all compile when met); peers:
        the other processes of a multi-process deployment (jaxllm.multiprocess.Followers); sink: where requests'
        events go instead of their own RequestStream (the engine core's process: see jaxllm.engine.core),
        `sink.stream(request_id)` per request and `sink.flush(stats)` after every loop iteration, so that one
        iteration's events leave together; with a sink, the text of rows whose text the engine does not need is
        left to the frontend (EventMaker.text_elsewhere); compile_later: after the start-up set (warmup None, one
        process), compile the shapes that follow it on a background thread whenever the engine has been without
        work for QUIET_BEFORE_COMPILING_S (a server's engine)."""
        self.args = args
        self.config = model.config
        self.tokenizer = tokenizer
        # A reward model (a score head): every request is scored (submit_score), none generates.
        self.scoring = model.config.score_head is not None
        self.rules = SubmitRules(args, model.config.vocab_size, self.scoring, tokenizer is not None)
        self._sink = sink
        prefix_cache = PrefixCache() if args.use_dynamic_prompt_cache else None
        self.kv = KVCache(args.max_total_token_num, args.running_max_req_size, prefix_cache=prefix_cache)
        self.scheduler = build_scheduler(args, self.kv)
        enable_compilation_cache()
        # A vision-language model under --enable_multimodal: images are preprocessed (image_processor, off this
        # thread), cached and encoded (self._images) before their requests reach the scheduler.
        self.image_processor, image_rows = image_buffer(args, model.config)
        loading = params if isinstance(params, Future) else None
        if loading is not None:
            params = placed_shapes(model, mesh, args.tp)
        with phase("kv-cache"):  # the runner's device state: KV buffers, slot tables
            self.runner = build_runner(args, model, params, mesh, self.kv, self.scheduler.max_step_tokens, peers,
                                       image_rows=image_rows)
        self._images: ImageStage | None = None
        if image_rows:
            cache = ImageCache(args.cache_capacity, args.cache_reserved_ratio, image_rows)
            family = vision_family(model.config.vision.family)
            self._images = ImageStage(cache, functools.partial(family.batches, model.config), self.runner.encode_images,
                                      self.runner.image_scratch_row)
            if warmup != 0:  # the encoder compiled at start-up too (written to the scratch row)
                loading = self._await_weights(loading)  # (it runs the encoder on them)
                with phase("compile-images"):
                    for example in family.warmup_batches(model.config, self._images.max_batch):
                        self._images.run_example(example)
        with phase("compile-steps"):
            self.runner.warmup(warmup)
        self._await_weights(loading)
        self._events = EventMaker(tokenizer, args.eos_id, prompt_cache=prefix_cache is not None,
                                  cumlogprob=args.diverse_mode or args.beam_mode, text_elsewhere=sink is not None)
        self._grammars: Grammars | None = None  # made (and its worker process started) with the first grammar
        self._healer = TokenHealer(tokenizer, self.config.vocab_size) if args.token_healing_mode else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._idle = threading.Event()  # set once the loop has finished all work and its bookkeeping
        self._launching: Future | None = None  # the launch of the step after the one being read
        self._wakes = None  # WakeBatch: async consumers' wake-ups, gathered while a step is read
        self._finals: list | None = None  # (request, final event) of requests finished by the step being read
        self._requests: dict[str, Request] = {}
        self._arrivals = 0
        self._arrival_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._step_listeners: list = []
        # Totals since start. host_s: time the loop spent on the host (scheduling, preparing, dispatching,
        # postprocessing, the stats snapshot and the core's message, and compiling a shape met for the first
        # time); device_wait_s: time it waited for results, the device still busy. Host time per step below
        # device time per step: device-bound.
        # Parts of host_s: schedule_s (the scheduler), dispatch_s (building a step's inputs, and waiting for
        # its launch once the previous step's results are read), postprocess_s (tokens, text, stops).
        # Each of host_s and its parts has a NAME_cpu_s twin: the engine thread's CPU time in it (no waits for a
        # busy core; host_cpu_s does count the device wait's little CPU time).
        # launch_s: the transfer and the jitted call, on the launch thread (overlapping postprocess);
        # launch_cpu_s: that thread's CPU time in them (the rest it waited: for the GIL, a lock, the device).
        # steps_after_idle: steps launched after the unread step before them had finished (the device idled);
        # steps_after_idle_after_prefill: those of them whose step before was a prefill. steps_idle_by_enqueue
        # (and _after_prefill): steps whose step before had finished when their enqueue returned (an upper bound;
        # the other a lower one: an enqueue may wait for its inputs' copy, which waits for the step before).
        # constrained_steps: steps with allowed-token masks; mask_s: time building those masks (the grammar
        # engine's time per step in the mask worker, overlapping the device's model call, and token healing's
        # rows here); mask_wait_s: time the engine thread waited for the mask worker's answers (part of host_s).
        self._counters = {"steps": 0, "prefill_steps": 0, "decode_steps": 0, "prefill_tokens": 0,
                          "decode_tokens": 0, "preemptions": 0, "finished": 0, "failed_steps": 0,
                          "host_s": 0.0, "device_wait_s": 0.0, "schedule_s": 0.0, "dispatch_s": 0.0,
                          "launch_s": 0.0, "launch_cpu_s": 0.0, "postprocess_s": 0.0, "steps_after_idle": 0,
                          "steps_after_idle_after_prefill": 0, "steps_idle_by_enqueue": 0,
                          "steps_idle_by_enqueue_after_prefill": 0,
                          "host_cpu_s": 0.0, "schedule_cpu_s": 0.0, "dispatch_cpu_s": 0.0, "postprocess_cpu_s": 0.0,
                          "constrained_steps": 0, "mask_s": 0.0, "mask_wait_s": 0.0}
        if prefix_cache is not None:  # prompt tokens of admitted requests, and those found cached
            self._counters.update(prompt_cache_hit_tokens=0, prompt_cache_query_tokens=0)
        self._peak, self._peak_at = 0, 0.0
        self._idle_launches = collections.deque(maxlen=self.IDLE_LAUNCHES_KEPT)  # StepLoop.idle_launches
        self._snapshot = self._take_snapshot()
        self._idle_since: float | None = None  # when the loop last ran out of work (None: it has work)
        if compile_later and warmup is None and peers is None:
            self.runner.compile_later(lambda: self.quiet_for(QUIET_BEFORE_COMPILING_S))

    @classmethod
    def from_args(cls, args, *, warmup: int | None = None, sink=None, compile_later: bool = False) -> "Engine":
        """Load config, tokenizer and weights from args.model_dir onto a --tp mesh; compile the steps. With
        --nccl_port and --tp > 1, first start a process per other device, each running the same steps."""
        enable_compilation_cache()  # before the first compile (random weights are made by one)
        if warmup is None:
            warmup = warmup_from_env()
        followers = multiprocess.start(args, warmup) if args.processes > 1 else None
        loaded = load_model(args, multiprocess.mesh_devices() if followers else None, weights_behind=True)
        return cls(args, loaded.model, loaded.params, loaded.mesh, loaded.tokenizer, warmup=warmup, peers=followers,
                   sink=sink, compile_later=compile_later)

    def _await_weights(self, loading: Future | None) -> None:
        """The runner's weights once `loading` (None: they are loaded already) is done; returns None."""
        if loading is not None:
            with phase("weights-wait"):  # the load's own seconds: its weights-<format> line
                self.runner.params = loading.result()

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            heap.freeze_startup_heap()  # start-up's objects out of the full collections' scans (jaxllm/heap.py)
            self._stopping = False
            self._idle_since = None
            self._thread = threading.Thread(target=os_named(self._loop), name="jaxllm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop; requests still queued or running end with finish_reason "abort"."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None
        self.runner.stop_compiling_later()
        if self._grammars is not None:
            self._grammars.close()
        heap.thaw()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # --- API (any thread) ----------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt to run (truncated per --long_truncation_mode) or ValueError with the reason."""
        return self.rules.prompt(prompt_ids, params)

    def check_guided(self, guided) -> None:
        """Compile a request's grammar now (kept for its submit); ValueError naming its field when invalid."""
        self.grammars().check(guided)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue one sequence (best_of 1; see submit_group); never blocks. Raises ValueError for invalid
        parameters or lengths."""
        return self.submit_many([(prompt_ids, params, request_id)])[0]

    def submit_group(self, prompt_ids: list[int], params: SamplingParams,
                     request_ids: list[str] | None = None, images: tuple = ()) -> list[RequestStream]:
        """Queue the params.best_of sequences of one prompt as a group: the prompt is prefilled once and its KV
        shared. Members sample independently (member i with seed + i when seeded), or, with --beam_mode, are
        the beams of a beam search whose streams get their tokens when the search ends, best first. Aborting
        any member aborts the group. `images`: the prompt's images (ImageInput, one per placeholder; see
        submit_images). Raises ValueError for invalid parameters or lengths."""
        count = params.best_of
        request_ids = self.rules.group(params, request_ids)
        if count == 1:
            return [self.submit_images(prompt_ids, params, images, request_ids[0])]
        members = [self._new_request(list(prompt_ids), member_params(params, i), rid, images=images)
                   for i, rid in enumerate(request_ids)]
        beam = None
        if self.args.beam_mode:
            p = members[0].params
            beam = BeamSearch(count, self.args.eos_id, p.max_new_tokens, p.ignore_eos)
        SequenceGroup(members, beam)
        self._inbox.put(("add", members))
        self._wake.set()
        return [m.stream for m in members]

    def submit_images(self, prompt_ids: list[int], params: SamplingParams, images: tuple,
                      request_id: str | None = None) -> RequestStream:
        """Queue one sequence whose prompt has one image placeholder (`config.vision.image_token_id`) per image
        of `images` (`ImageInput`s from `image_processor`). Needs a vision-language model and
        --enable_multimodal; raises ValueError for invalid parameters, lengths or a placeholder count that
        differs from the images'."""
        req = self._new_request(list(prompt_ids), params, request_id, images=images)
        self._inbox.put(("add", [req]))
        self._wake.set()
        return req.stream

    def submit_score(self, prompt_ids: list[int], request_id: str | None = None) -> RequestStream:
        """Queue one prompt to score (a reward model): it is prefilled, batched with the others, and its stream
        yields one event carrying the score head's outputs at its last token that is not padding (TokenEvent.score;
        trailing padding is not run); its KV is freed after that step (or kept by the prompt cache). Raises
        ValueError for an invalid prompt."""
        prompt_ids = list(prompt_ids)
        if self.scoring:
            prompt_ids = prompt_ids[: self.config.score_head.scored_length(prompt_ids)]
        req = self._new_request(prompt_ids, SCORE_PARAMS, request_id, scoring=True)
        self._inbox.put(("add", [req]))
        self._wake.set()
        return req.stream

    def submit_many(self, requests: list[tuple[list[int], SamplingParams, str | None]]) -> list[RequestStream]:
        """Queue several sequences at once: the engine sees them together (one admission decision), so the
        same submission to an idle engine always runs as the same steps. All are checked before any is
        queued."""
        self.rules.singles(requests)
        built = [self._new_request(list(ids), params, rid) for ids, params, rid in requests]
        self._inbox.put(("add", built))
        self._wake.set()
        return [req.stream for req in built]

    def _new_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None,
                     scoring: bool = False, images: tuple = ()) -> Request:
        prompt_ids, params = self.rules.sequence(prompt_ids, params, scoring)
        spans = ()
        if images:
            prompt_ids, spans = self.rules.images(prompt_ids, params, list(images), self.config.vision)
        with self._arrival_lock:
            arrival = self._arrivals
            self._arrivals += 1
        req = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            params=params,
            seed=params.seed % 2**64 if params.seed is not None else secrets.randbits(64),
            arrival=arrival,
            images=spans,
        )
        if params.guided is not None:
            req.constraint = self.grammars().constraint(params.guided)
        elif self._healer is not None:  # a grammar decides the text itself: no healing under one
            req.prompt_ids, req.healing = self._healer.heal(prompt_ids)
            req.constraint = req.healing
        self._events.attach(req)
        req.stream = RequestStream(req.request_id) if self._sink is None else self._sink.stream(req.request_id)
        return req

    def grammars(self) -> Grammars:
        """Guided requests' grammars, kept in the mask worker (ValueError when the engine has no tokenizer)."""
        with self._arrival_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.args.eos_id, self.args.running_max_req_size,
                                          self.runner.mask_words)
        return self._grammars

    def abort(self, request_id: str) -> None:
        """End a request: its KV is freed within one step and its stream ends with "abort"."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def quiet_for(self, seconds: float) -> bool:
        """Whether the loop runs and has had no work for the last `seconds`."""
        since = self._idle_since
        return self._thread is not None and since is not None and time.monotonic() - since >= seconds

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the loop has no work left and has finished the bookkeeping of its last step (the
        counters in stats() then include every step). False if `timeout` seconds passed first."""
        return self._idle.wait(timeout)

    def token_load(self) -> dict:
        return dict(self._snapshot["token_load"])

    def stats(self) -> dict:
        return dict(self._snapshot)

    def add_step_listener(self, listener) -> None:
        """Call `listener(StepReport)` on the engine thread after every step's results are read (metrics)."""
        self._step_listeners.append(listener)

    def remove_step_listener(self, listener) -> None:
        self._step_listeners.remove(listener)

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        """Finish a request that gets no more tokens (abort, error, shutdown), with its whole group."""
        for member in req.group.members if req.group is not None else [req]:
            if not member.finished:
                self._retire(member, reason)
                self._emit(member, final_event(member, reason, error))

    def _retire(self, req: Request, reason: str, snapshot: bool = True) -> None:
        """Take `req` out of the engine, its KV freed. `snapshot`: refresh the stats now, so that readers see the
        KV freed once the final event is out (False: the caller refreshes them before it emits that event)."""
        if self._images is not None and self._images.release(req):  # still waiting for its images
            req.status, req.finish_reason = RequestStatus.FINISHED, reason
        else:
            self.scheduler.finish(req, reason)
        release_constraint(req)
        self._requests.pop(req.request_id, None)
        self._counters["finished"] += 1
        if snapshot:
            self._snapshot = self._take_snapshot()

    def _emit(self, req: Request, event: TokenEvent) -> None:
        """Hand `event` to req's consumer; while a step's results are read, async consumers are woken
        together once the step's events are all out (self._wakes)."""
        if not req.stream.put(event, self._wakes) and not req.finished:  # the consumer's event loop is gone
            self._end(req, "abort")

    # --- stats ---------------------------------------------------------------------------------

    def _take_snapshot(self) -> dict:
        """What stats() and token_load() return. The peak estimate (a sort over the running requests) is
        refreshed every 50 ms at most."""
        total = self.kv.num_slots
        used = self.kv.num_used
        now = time.monotonic()
        if not self.scheduler.running:
            self._peak = 0
        elif now - self._peak_at > 0.05:
            self._peak, self._peak_at = self.scheduler.estimated_peak(), now
        peak = self._peak
        waiting = self.scheduler.waiting
        paused = sum(1 for r in waiting if r.status is RequestStatus.PAUSED)
        return {
            "running": len(self.scheduler.running),
            "waiting": len(waiting) - paused,
            "paused": paused,
            "kv_used": used,
            "kv_total": total,
            "kv_cached": self.kv.num_cached,
            **(self._images.stats() if self._images is not None else {}),
            "token_load": {
                "current_load": used / total,
                "logical_max_load": peak / total,
                "dynamic_max_load": peak / total,
            },
            **self._counters,
        }

