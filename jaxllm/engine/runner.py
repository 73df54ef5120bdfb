"""Runs scheduled steps on the device: one jitted function (model + sampler) over bucketed shapes, KV state
donated, dispatched asynchronously. Sampled ids stay on the device as the next step's inputs; the host
reads each step's results later (`fetch`), while the device runs the following step. A step with constrained
rows (an allowed-token mask) runs in two calls: the model (`launch`), then the sampler with the masks
(`sample_constrained`), which the host builds from the previous step's tokens while the device runs the model.
`prepare` builds a step's self-contained DeviceStep from the requests; everything after it reads only that.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxllm import heap
from jaxllm.engine import device_steps
from jaxllm.engine.constraints import StepMasks
from jaxllm.engine.kv_cache import KVCache, init_device_kv
from jaxllm.engine.scheduler import SchedulerOutput, TableFill
from jaxllm.engine.step_inputs import DeviceStep, StepInputBuilder, StepInputs, pack
from jaxllm.engine.step_shapes import StepShape, pick_bucket, pow2_buckets
from jaxllm.models.mla import kernel_fits
from jaxllm.thread_names import name_os_thread, os_named

log = logging.getLogger(__name__)


def enable_compilation_cache() -> str:
    """Turn on JAX's persistent compilation cache (~/.cache/jaxllm/jax unless a directory is set)."""
    # Every executable, not only those that took JAX's default second to compile: a warm start then compiles
    # nothing (the small ones — random weights, table fills, short steps — add up to seconds at each start).
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    path = jax.config.jax_compilation_cache_dir
    if not path:
        path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path.home() / ".cache" / "jaxllm" / "jax")
        jax.config.update("jax_compilation_cache_dir", path)
    return path


_PREFILL_ROWS = 256  # rows of a prefill step, unless it holds more chunks (see ModelRunner.prefill_rows)


def warmup_from_env() -> int | None:
    """$JAXLLM_WARMUP_SHAPES: how many start-up step shapes a server compiles before it answers /health (unset: the
    start-up set; 0: none, each shape then compiles when a step first meets it, as the log says). Fewer shapes
    start sooner and stall the first steps that meet the rest: for tests and quick trials, not for serving."""
    value = os.environ.get("JAXLLM_WARMUP_SHAPES", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"JAXLLM_WARMUP_SHAPES must be a whole number of step shapes, not {value!r}")
    return int(value)


_QUIET_POLL_S = 0.5  # how often compile_later asks whether the engine is quiet


def _abstract(leaf):
    """An array's shape, dtype and sharding (a leaf that is no array as it is)."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


def _compile_threads() -> int:
    """Start-up shapes compiled at once: $JAXLLM_COMPILE_THREADS, by default one per core, at most 8 (each compile
    holds its own memory)."""
    return max(1, int(os.environ.get("JAXLLM_COMPILE_THREADS") or min(8, os.cpu_count() or 1)))


@dataclasses.dataclass
class PreparedStep:
    """A scheduled step's host inputs, ready to launch (ModelRunner.prepare → ModelRunner.launch)."""

    batch: SchedulerOutput
    device: DeviceStep  # all that the device work reads
    offsets: list[int]  # each chunk's first index in the packed tokens
    rows: dict[str, int]  # request id → its row of the device's last tokens, for the requests this step samples
    staged: tuple | None = None  # once sent (ModelRunner.stage): its packed inputs on the device, their layout, fills

    @property
    def shape(self) -> StepShape:
        return self.device.shape

    @property
    def carried(self) -> bool:
        """Its rows go past those of the steps before (StepInputBuilder.carry_base)."""
        return bool(self.device.inputs.last_base[0])


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: its schedule and its (device) results."""

    batch: SchedulerOutput
    sampled: jax.Array  # [R] i32; a reward model's scores [R, labels] f32
    logprobs: jax.Array  # [R] f32
    # (logprobs [T] f32,) when the step computed all-position logits, + (ids [T, K], logprobs [T, K]) with top_logprobs
    prompt_logprobs: tuple[jax.Array, ...] | None
    token_offsets: list[int]  # each chunk's first index in the packed tokens
    top: tuple[jax.Array, jax.Array] | None = None  # ([R, K] i32 ids, [R, K] f32 logprobs), best first, if asked
    # A constrained step until sample_constrained: the sampler's device inputs (logits, history, packed inputs)
    # and its static arguments; sampled, logprobs and top are None until then.
    unsampled: tuple | None = None
    # time.perf_counter() when its launch began (not its preparation: looking ahead, a step is prepared a step
    # before it launches)
    dispatched_at: float = 0.0
    launch_s: float = 0.0  # time of the transfer and the step call, on the thread that launched it
    launch_cpu_s: float = 0.0  # that thread's CPU time in it (less than launch_s: the launch waited)
    # The step before it, not yet read, had already finished when this one was launched: the device waited
    # for the host in between (with the engine one step ahead, the host's time per step is then exposed).
    after_idle: bool = False
    # The step before it had finished by the time this one's enqueue returned (an upper bound of the device's idle
    # launches, where `after_idle` is the lower one: an enqueue that waits for its inputs' copy, queued behind the
    # step before, begins before that step ends and returns after it).
    idle_by_enqueue: bool = False
    failure: Exception | None = None  # a constrained step whose sampler could not be enqueued (its masks failed)
    masks: StepMasks | None = None  # a constrained step's masks, asked of the mask worker early

    @property
    def rows(self) -> int:
        """The step's rows, padding included."""
        return (self.sampled if self.unsampled is None else self.unsampled[0]).shape[0]


@dataclasses.dataclass
class StepResult:
    sampled: np.ndarray | None  # [rows of the batch]; None for a reward model, which samples nothing
    logprobs: np.ndarray
    prompt_logprobs: tuple[np.ndarray, ...] | None  # as StepHandle's
    token_offsets: list[int]
    top_ids: np.ndarray | None = None  # [rows of the batch, K]: most likely tokens, when the step reports them
    top_logprobs: np.ndarray | None = None
    scores: np.ndarray | None = None  # [rows of the batch, labels]: a reward model's scores


def _mrope_positions(config):
    """An M-RoPE model's (Qwen2-VL) `rope(images, start, stop)` for the step inputs: its vision family's
    `rope_positions` (jaxllm/models/vision/interface.py); None for any other model."""
    if not config.rope.mrope_section or config.vision is None:
        return None
    from jaxllm.models.vision.registry import vision_family

    return functools.partial(vision_family(config.vision.family).rope_positions, config)


class ModelRunner:
    """Owns the device state (params, KV, last sampled ids) and the compiled step per shape bucket."""

    def __init__(
        self,
        model,
        params,
        mesh: Mesh,
        kv_spec: PartitionSpec,
        kv: KVCache,
        *,
        max_len: int,
        max_prefill_tokens: int,
        eos_ids: tuple[int, ...],
        min_width: int = 64,
        min_prefill_tokens: int = 16,
        peers=None,
        image_rows: int = 0,
        mixed_steps: bool = False,
    ):
        """peers: in process 0 of a multi-process deployment, the other processes (jaxllm.multiprocess.Followers),
        which are sent each piece of device work before it is enqueued here; image_rows: rows of the
        image-embedding buffer (a vision-language model's image cache; 0: none); mixed_steps: decodes and
        prefill chunks share steps (--splitfuse_mode), so prefill steps often have a row per running request."""
        self.model = model
        self.peers = peers
        self.mixed_steps = mixed_steps
        self.params = params
        self.mesh = mesh
        self.host_kv = kv
        self.vocab_size = model.config.vocab_size
        self.scoring = model.config.score_head is not None  # a reward model: steps return scores, not tokens
        self.eos_ids = tuple(int(e) for e in eos_ids if 0 <= e < self.vocab_size)
        # Step shapes: decodes by row count; prefill (and mixed) steps by token count alone (their rows:
        # prefill_rows); slot-table widths bucketed only when the attention's cost follows the width.
        self.row_buckets = pow2_buckets(kv.num_rows)[:-1] + [kv.num_rows]  # the last one: every request row
        self.max_rows = kv.num_rows + 1
        self.token_buckets = pow2_buckets(max_prefill_tokens, min_prefill_tokens)
        self.width_buckets = pow2_buckets(max_len, min(min_width, max_len))
        if not model.backend.cost_follows_width and (model.config.mla is None or kernel_fits(model.config)):
            self.width_buckets = self.width_buckets[-1:]
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._kv_spec = kv_spec
        vision = model.config.vision if image_rows else None
        self.inputs = StepInputBuilder(kv, self.vocab_size, vision.image_token_id if vision is not None else None,
                                       rope=_mrope_positions(model.config))
        kv_shardings = self._init_device_state()
        rep = self._replicated
        self._jitted = jax.jit(
            functools.partial(device_steps.step, model, self.eos_ids),
            static_argnames=("layout", "width", "decode_only", "all_logits", "penalties", "sampling",
                             "top_logprobs", "typical"),
            donate_argnums=(1, 2),
            out_shardings=(kv_shardings, rep, rep, rep, rep, rep, None),  # logits: as the model leaves them
        )
        # Compiled per shape when first met: steps without constrained rows never call it.
        self._sample_masked = jax.jit(
            functools.partial(device_steps.sample_masked, self.eos_ids),
            static_argnames=("layout", "width", "penalties", "sampling", "top_logprobs", "typical"),
            donate_argnums=(0,), out_shardings=(rep, rep, rep, rep),
        )
        self.mask_words = (self.vocab_size + 31) // 32  # int32 words of a row's allowed-token mask
        self._fill = jax.jit(device_steps.fill_tables, donate_argnums=(0,), out_shardings=kv_shardings)
        # A vision-language model: image embeddings live in one buffer (the image cache's rows + a scratch row).
        self.image_slab = None
        if vision is not None:
            self.image_slab = jax.device_put(np.zeros((image_rows + 1, model.config.hidden_size), model.dtype), rep)
            self._encode = jax.jit(functools.partial(device_steps.encode_images, model), static_argnames=("grid",),
                                   donate_argnums=(1,), out_shardings=rep)
        # The compiled step of each shape, called directly: on the GPU the jit's own call path costs ~4 ms
        # more host time per step than its compiled executable's (docs/perf.md, session 3).
        self._executables: dict[StepShape, jax.stages.Compiled] = {}
        self._samplers: dict[tuple, jax.stages.Compiled] = {}  # `_sample_masked` compiled, by its sizes
        self.shapes_seen: set[StepShape] = set()  # compiled at start-up or met by a step
        self._warm = False  # the start-up shapes are compiled: what compiles now is met while serving
        # Shapes being built, so that a step meeting one the background thread builds waits for it.
        self._building: dict[StepShape, threading.Event] = {}
        self._build_lock = threading.Lock()
        self._later: threading.Thread | None = None  # compiles the shapes after the start-up set (compile_later)
        self._stop_later = threading.Event()

    # --- shapes --------------------------------------------------------------------------------
    def shape_of(self, batch: SchedulerOutput, table_rows: np.ndarray | None = None) -> StepShape:
        """The compiled step `batch` runs in. `table_rows`: each chunk's table row (`inputs.row_values.rows_of`),
        when the caller has them."""
        chunks = batch.chunks
        if table_rows is None:
            table_rows = self.inputs.row_values.rows_of(batch)
        decode_only = batch.kind == "decode" or all(c.num_tokens == 1 for c in chunks)  # (a member's first
        if decode_only:  # sample has no tokens: not a decode)
            tokens = rows = pick_bucket(self.row_buckets, len(chunks))
        else:
            tokens = pick_bucket(self.token_buckets, batch.num_tokens)
            rows = self.prefill_rows(tokens, len(chunks))
        width = pick_bucket(self.width_buckets, max(c.start + c.num_tokens for c in chunks))
        all_logits = batch.kind != "decode" and any(c.prompt_logprobs for c in chunks)
        return StepShape(tokens, rows, width, decode_only, all_logits=all_logits,
                         **self.inputs.row_values.shape_flags(batch, table_rows))

    def prefill_rows(self, tokens: int, chunks: int = 0) -> int:
        """Rows of a step with prefill chunks of `tokens` (bucketed) tokens: a row per token (each chunk has
        one or more) up to _PREFILL_ROWS, or, when `chunks` and a padding row need more, up to every request
        row and the padding row. Every row's logits are computed: the cap bounds them."""
        rows = min(tokens, self.max_rows, _PREFILL_ROWS)
        if chunks < rows:
            return rows
        if chunks <= tokens:
            return min(tokens, self.max_rows)
        # Group members' first samples are rows without tokens: more rows than tokens.
        return min(pick_bucket(pow2_buckets(self.max_rows), chunks + 1), self.max_rows)

    def warmup_shapes(self) -> tuple[list[StepShape], int]:
        """Every shape worth compiling ahead, most used first, and how many make the start-up set: decodes at
        every row count with the narrowest table and prefills of every token bucket (with mixed steps, also
        those with a row per request: a step's decodes make them common), then the rest: prefills with a row
        per request (without mixed steps only many short prompts in one step need them) and decodes at the
        wider tables."""
        narrow, *wider = self.width_buckets
        shapes = [StepShape(r, r, narrow, True) for r in self.row_buckets]
        every_row = []
        for t in self.token_buckets:
            w = pick_bucket(self.width_buckets, min(t, self.width_buckets[-1]))
            rows, all_rows = self.prefill_rows(t), self.prefill_rows(t, self.max_rows)
            shapes.append(StepShape(t, rows, w, False))
            if all_rows != rows:
                every_row.append(StepShape(t, all_rows, w, False))
        if self.mixed_steps:
            shapes, every_row = shapes + every_row, []
        startup = len(shapes)
        return shapes + every_row + [StepShape(r, r, w, True) for w in wider for r in self.row_buckets], startup

    def warmup(self, limit: int | None = None) -> int:
        """Compile the first `limit` start-up shapes (by default the start-up set), several at once; other
        shapes compile when first met. Returns how many were compiled."""
        shapes, startup = self.warmup_shapes()
        shapes = shapes[: startup if limit is None else limit]
        self.shapes_seen.update(shape.compiled_as() for shape in shapes)
        inputs = [self.inputs.padding(shape) for shape in shapes]
        # XLA compiles with the GIL released, so the shapes compile in parallel. Each shape's executable is
        # kept for its first step (no need to run each on padding).
        threads = _compile_threads()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jaxllm-compile",
                                initializer=name_os_thread) as pool:
            seconds = list(tqdm(pool.map(self._build, inputs, shapes), total=len(shapes),
                                desc="compiling steps", unit="shape", disable=not shapes))
        if shapes:
            # Lowering holds the GIL (the threads take turns); XLA's compile, or its read from the persistent
            # cache, does not.
            log.info("compiled %d step shapes in %d threads, seconds each (tokens x rows x width: lower + "
                     "compile): %s", len(shapes), threads,
                     ", ".join(f"{s.tokens}x{s.rows}x{s.width} {lower:.2f}+{compile:.2f}"
                               for s, (lower, compile) in zip(shapes, seconds)))
        self._warm = True
        return len(shapes)

    @property
    def compiled_shapes(self) -> set[StepShape]:
        return set(self._executables)

    def compiled_text(self) -> str:
        """The optimised HLO of every step compiled so far (a profile names its kernels after their fusions)."""
        return "\n".join(executable.as_text() for executable in list(self._executables.values()))

    def compile_later(self, quiet: Callable[[], bool]) -> None:
        """Compile the prefill shapes after the start-up set (warmup_shapes: those with a row per request) on a
        background thread, one at a time, each once `quiet()` says the engine has had no work for a while: a
        step meeting one of them later finds it built (or waits for its build to end) instead of stalling for a
        whole compile, and a compile (its autotuning runs kernels on the device, its threads take the cores)
        does not start while requests run, which it would slow. (Decodes at wider tables, the reference
        attention's, still compile when met: on a CPU they are dozens.)"""
        shapes, startup = self.warmup_shapes()
        later = [shape for shape in shapes[startup:] if not shape.decode_only]

        def build_each() -> None:
            started, built = time.perf_counter(), 0
            for shape in later:
                while not (self._stop_later.is_set() or quiet()):
                    self._stop_later.wait(_QUIET_POLL_S)
                if self._stop_later.is_set():
                    return
                try:
                    built += self._build_once(self.inputs.padding(shape), shape) is not None
                except Exception:  # noqa: BLE001 - a step meeting the shape compiles it again and reports
                    log.exception("compiling the step of shape %s in the background failed", shape)
            log.info("compiled %d step shapes after start-up in %.1f s, in the background", built,
                     time.perf_counter() - started)
            heap.freeze_startup_heap()  # their traces and executables join the heap the collector skips (quiet now)

        self._later = threading.Thread(target=os_named(build_each), name="jaxllm-compile-later", daemon=True)
        self._later.start()

    def stop_compiling_later(self, finish: bool = False) -> None:
        """Stop compile_later's thread after the shape it builds now (finish: once it has built them all)."""
        if not finish:
            self._stop_later.set()
        if self._later is not None:
            self._later.join()
            self._later = None

    def _compile(self, host: StepInputs, shape: StepShape) -> jax.stages.Compiled:
        """The compiled step of `shape` (inputs like `host`), compiled on the first call."""
        shape = shape.compiled_as()
        self.shapes_seen.add(shape)
        executable = self._executables.get(shape)
        if executable is None:
            started = time.perf_counter()
            self._build_once(host, shape)
            executable = self._executables[shape]
            self._note_compile(f"the step of shape {shape}", started)
        return executable

    def _build_once(self, host: StepInputs, shape: StepShape) -> tuple[float, float] | None:
        """_build, unless `shape` is built already (None) or another thread builds it (wait for that first)."""
        with self._build_lock:
            if shape in self._executables:
                return None
            other = self._building.get(shape)
            if other is None:
                mine = self._building[shape] = threading.Event()
        if other is not None:
            other.wait()
            return self._build_once(host, shape)  # built; or that build failed, and this one tries again
        try:
            return self._build(host, shape)
        finally:
            with self._build_lock:
                del self._building[shape]
            mine.set()

    def _build(self, host: StepInputs, shape: StepShape) -> tuple[float, float]:
        """Lower and compile the step of `shape` (inputs like `host`) and keep it; returns the seconds of each.
        Lowered against the arrays' shapes and shardings only: a step may donate them meanwhile."""
        shape = shape.compiled_as()
        started = time.perf_counter()
        words, layout = pack(host)
        words = jax.ShapeDtypeStruct(words.shape, words.dtype, sharding=self._replicated)
        state = jax.tree.map(_abstract, (self.params, self.kv, self._last_tokens, self.image_slab))
        lowered = self._jitted.lower(*state[:3], words, state[3], layout=layout, **shape.static_args())
        lowered_at = time.perf_counter()
        self._executables[shape] = lowered.compile()
        return lowered_at - started, time.perf_counter() - lowered_at

    def _note_compile(self, what: str, started: float) -> None:
        """Log a compile met while serving: its seconds stall the steps behind it, and on a GPU XLA records every
        executable's command buffers (CUDA graphs) again at their next call after a new executable loads."""
        if self._warm:
            log.info("compiled %s while serving, in %.2f s", what, time.perf_counter() - started)

    # --- steps ---------------------------------------------------------------------------------
    def prepare(self, batch: SchedulerOutput) -> PreparedStep:
        """The host half of a step (`launch` is the other): `batch`'s padded input arrays. Reads the requests
        and touches no device state, so it may run while another thread launches the previous step."""
        table_rows = self.inputs.row_values.rows_of(batch)
        shape = self.shape_of(batch, table_rows)
        fills = batch.fills
        if batch.kind != "decode":  # (decode chunks start past every prefix)
            fills = [TableFill(c.request, 0, c.cached_prefix) for c in batch.chunks if c.cached_prefix] + fills
        base = self.inputs.carry_base(batch, self.max_rows)
        host, offsets, rows = self.inputs.build(batch, shape, table_rows, last_base=base)
        device = DeviceStep(shape, host, self.inputs.table_fills(fills) if fills else None)
        return PreparedStep(batch, device, offsets, rows)

    def stage(self, step: PreparedStep) -> None:
        """Send a prepared step's inputs to the device now, and take it as the next step to launch (steps launch
        in the order they are staged: the step prepared after it reads its sampled rows). On a GPU the copy runs
        in stream order, behind the steps enqueued before it, and the step cannot be enqueued until it is done:
        staged before the step in flight is launched, it is not held behind that step (step_loop.py's looking
        ahead)."""
        step.staged = self._put(step.device)
        self.inputs.launched(step.rows, step.carried)

    def launch(self, step: PreparedStep, unread: StepHandle | None = None) -> StepHandle:
        """The device half of a step: transfer the inputs (unless staged) and enqueue the compiled step; returns at
        once (the device runs it in the background). Reads no request, so it may run on another thread while the
        engine reads the previous step's results (the call releases the GIL while it enqueues the kernels).
        `unread`: the step before, whose results are not read yet (the handle says whether it had finished:
        the device idled waiting for this launch)."""
        launched, launched_cpu = time.perf_counter(), time.thread_time()
        finished = lambda: unread is not None and unread.sampled is not None and unread.sampled.is_ready()  # noqa: E731
        after_idle = finished()
        if self.peers is not None:
            self.peers.send(("step", step.device))
        # Not staged yet across processes: sent after the message, and in the order the other processes send
        # theirs (`_put`), as a transfer to the devices of every process waits for all of them.
        if step.staged is None:
            self.stage(step)
        sampled, logprobs, prompt_lp, top, unsampled = self.execute(step.device, step.staged)
        launch_s, launch_cpu_s = time.perf_counter() - launched, time.thread_time() - launched_cpu
        idle_by_enqueue = after_idle or finished()
        if not step.shape.all_logits:
            prompt_lp = None
        if not step.shape.top_logprobs:
            top = None
        for array in (sampled, logprobs, *(prompt_lp or ()), *(top or ())):
            if array is not None:
                array.copy_to_host_async()
        return StepHandle(step.batch, sampled, logprobs, prompt_lp, step.offsets, top, unsampled, launched,
                          launch_s, launch_cpu_s, after_idle, idle_by_enqueue)

    def sample_constrained(self, handle: StepHandle, mask: np.ndarray) -> None:
        """Enqueue a constrained step's sampler with each row's allowed-token mask [rows, mask_words] int32
        (all ones for unconstrained and padding rows); handle.sampled, logprobs (and top) then exist."""
        if self.peers is not None:
            self.peers.send(("sample", mask))
        handle.sampled, handle.logprobs, top = self.execute_sampler(handle.unsampled, mask)
        handle.top = top if handle.unsampled[-1]["top_logprobs"] else None
        handle.unsampled = None
        for array in (handle.sampled, handle.logprobs, *(handle.top or ())):
            array.copy_to_host_async()

    def execute(self, step: DeviceStep, staged: tuple | None = None):
        """Enqueue a step's device work (table fills, then the compiled step; `staged`: its inputs already sent,
        `stage`). Returns (sampled, logprobs, prompt logprobs, top, None), or for a constrained step (None, None,
        prompt logprobs, None, the sampler's pending inputs for `execute_sampler`)."""
        words, layout, fills = staged if staged is not None else self._put(step)
        if fills is not None:
            self.kv = self._fill(self.kv, *fills)
        return self._run(step.inputs, step.shape, words, layout)

    @property
    def image_scratch_row(self) -> int:
        """The image buffer's row that padding outputs write."""
        return self.image_slab.shape[0] - 1

    def encode_images(self, inputs: tuple[np.ndarray, ...], grid: tuple, rows: np.ndarray) -> None:
        """Enqueue one encoder call (an `EncodeBatch`'s inputs and static part) writing its outputs into the image
        buffer's rows [B, T] (padding outputs: `image_scratch_row`); sent to the other processes first."""
        inputs, grid, rows = tuple(inputs), tuple(grid), np.asarray(rows, np.int32)
        if self.peers is not None:
            self.peers.send(("encode", inputs, grid, rows))
        inputs, rows = jax.device_put((inputs, rows), self._replicated)
        self.image_slab = self._encode(self.params, self.image_slab, inputs, rows, grid=grid)

    def execute_sampler(self, unsampled: tuple, mask: np.ndarray):
        """Enqueue a constrained step's sampler (`unsampled`: what `execute` returned for it) with the masks.
        Returns (sampled, logprobs, top)."""
        logits, token_table, words, statics = unsampled
        mask = jax.device_put(mask, self._replicated)
        args = (self._last_tokens, logits, token_table, words, mask)
        key = (tuple(sorted(statics.items())), logits.shape, words.shape, mask.shape)
        sampler = self._samplers.get(key)
        if sampler is None:  # compiled when first met, called directly after (as the steps are)
            started = time.perf_counter()
            sampler = self._samplers[key] = self._sample_masked.lower(*args, **statics).compile()
            self._note_compile(f"the masked sampler of {logits.shape[0]} rows", started)
        self._last_tokens, sampled, logprobs, top = sampler(*args)
        return sampled, logprobs, top

    def fetch(self, handle: StepHandle) -> StepResult:
        """Wait for a dispatched step's results on the host."""
        n = len(handle.batch.chunks)
        top_ids, top_lp = (np.asarray(a)[:n] for a in handle.top) if handle.top is not None else (None, None)
        rows = np.asarray(handle.sampled)[:n]
        return StepResult(
            sampled=None if self.scoring else rows,
            scores=rows if self.scoring else None,
            logprobs=np.asarray(handle.logprobs)[:n],
            prompt_logprobs=None if handle.prompt_logprobs is None else tuple(map(np.asarray, handle.prompt_logprobs)),
            token_offsets=handle.token_offsets,
            top_ids=top_ids,
            top_logprobs=top_lp,
        )

    def _put(self, step: DeviceStep) -> tuple:
        """Send a step's host arrays to the devices: (its inputs packed into one array, the layout that unpacks
        them, its table fills or None)."""
        words, layout = pack(step.inputs)
        fills = None if step.table_fills is None else jax.device_put(step.table_fills, self._replicated)
        return jax.device_put(words, self._replicated), layout, fills

    def _run(self, host: StepInputs, shape: StepShape, words: jax.Array, layout: tuple):
        executable = self._compile(host, shape)
        self.kv, self._last_tokens, sampled, logprobs, prompt_lp, top, logits = executable(
            self.params, self.kv, self._last_tokens, words, self.image_slab
        )
        if not shape.constrained:
            return sampled, logprobs, prompt_lp, top, None
        statics = {"layout": layout, "width": shape.width, "penalties": shape.penalties,
                   "sampling": shape.sampling, "top_logprobs": shape.top_logprobs, "typical": shape.typical}
        return None, None, prompt_lp, None, (logits, self.kv.token_table, words, statics)

    def _init_device_state(self):
        kv = self.host_kv
        self.kv, shardings = init_device_kv(
            self.model, kv.num_slots, kv.num_rows, self.width_buckets[-1], self.mesh, self._kv_spec
        )
        self._last_tokens = jax.device_put(np.zeros(self.max_rows, np.int32), self._replicated)
        jax.block_until_ready(self.kv)  # allocated now, not inside the first step's time
        return shardings

    def device_state_lost(self) -> bool:
        """Whether a failed step consumed the donated buffers."""
        return any(a.is_deleted() for a in jax.tree.leaves((self.kv, self._last_tokens)))

    def reset_device_state(self) -> None:
        """Fresh KV buffers after a failed step consumed them: every request's KV is gone."""
        if self.peers is not None:
            self.peers.send(("reset",))
        self._init_device_state()
        self.inputs.reset()
