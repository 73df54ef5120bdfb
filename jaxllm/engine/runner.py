"""Runs scheduled steps on the device: one jitted function (model + sampler) over bucketed shapes, KV state
donated, dispatched asynchronously. Sampled ids stay on the device as the next step's inputs; the host
reads each step's results later (`fetch`), while the device runs the following step. A step with constrained
rows (an allowed-token mask) runs in two calls: the model (`launch`), then the sampler with the masks
(`sample_constrained`), which the host builds from the previous step's tokens while the device runs the model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxllm.engine.kv_cache import KVCache, init_device_kv
from jaxllm.engine.request import MAX_TOP_LOGPROBS, Request
from jaxllm.engine.sampler import PADDING_ROW, SamplingBatch, sample, sampling_row, seed_words
from jaxllm.engine.scheduler import SchedulerOutput, TableFill
from jaxllm.engine.step_inputs import StepInputs, pack, unpack
from jaxllm.models.attention import AttentionMetadata
from jaxllm.models.mla import kernel_fits

_PADDING_SAMPLING = (*PADDING_ROW, 0, 0)  # a padding row's sampling values and seed words


def enable_compilation_cache() -> str:
    """Turn on JAX's persistent compilation cache (~/.cache/jaxllm/jax unless a directory is set)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path.home() / ".cache" / "jaxllm" / "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


_PREFILL_ROWS = 256  # rows of a prefill step, unless it holds more chunks (see ModelRunner.prefill_rows)


def _compile_threads() -> int:
    """Start-up shapes compiled at once: one per core, at most 8 (each compile holds its own memory)."""
    return max(1, min(8, os.cpu_count() or 1))


def pow2_buckets(max_value: int, minimum: int = 1) -> list[int]:
    """minimum, 2·minimum, … up to the first power of two ≥ max_value."""
    buckets = [minimum]
    while buckets[-1] < max_value:
        buckets.append(buckets[-1] * 2)
    return buckets


def pick_bucket(buckets: list[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What a compiled step is specialised on: bucket sizes and the static switches."""

    tokens: int
    rows: int
    width: int
    decode_only: bool
    all_logits: bool = False  # some row wants prompt logprobs
    penalties: bool = False  # some row has a repetition / frequency / presence penalty
    sampling: bool = False  # some row is not greedy
    top_logprobs: bool = False  # some row reports its most likely tokens' logprobs (MAX_TOP_LOGPROBS of them)
    constrained: bool = False  # some sampled row has an allowed-token mask: the sampler runs as a second call

    def static_args(self) -> dict:
        """The step function's static arguments (sizes come with the arrays)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("tokens", "rows")}


@dataclasses.dataclass
class PreparedStep:
    """A scheduled step's host inputs, ready to launch (ModelRunner.prepare → ModelRunner.launch)."""

    batch: SchedulerOutput
    shape: StepShape
    host: StepInputs
    offsets: list[int]  # each chunk's first index in the packed tokens
    rows: dict[str, int]  # request id → its row, for the requests this step samples
    prefix_columns: tuple[np.ndarray, ...] | None  # table fills to run first: prompt cache, forks (_fill_tables)
    prepared_at: float  # time.perf_counter() when its preparation began


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: its schedule and its (device) results."""

    batch: SchedulerOutput
    sampled: jax.Array  # [R] i32; a reward model's scores [R, labels] f32
    logprobs: jax.Array  # [R] f32
    prompt_logprobs: jax.Array | None  # [T] f32 when the step computed all-position logits
    token_offsets: list[int]  # each chunk's first index in the packed tokens
    top: tuple[jax.Array, jax.Array] | None = None  # ([R, K] i32 ids, [R, K] f32 logprobs), best first, if asked
    # A constrained step until sample_constrained: the sampler's device inputs (logits, history, ints, floats)
    # and its static arguments; sampled, logprobs and top are None until then.
    unsampled: tuple | None = None
    dispatched_at: float = 0.0  # time.perf_counter() when its preparation began (PreparedStep.prepared_at)
    launch_s: float = 0.0  # time of the transfer and the step call, on the thread that launched it
    # The step before it, not yet read, had already finished when this one was launched: the device waited
    # for the host in between (with the engine one step ahead, the host's time per step is then exposed).
    after_idle: bool = False

    @property
    def rows(self) -> int:
        """The step's rows, padding included."""
        return (self.sampled if self.unsampled is None else self.unsampled[0]).shape[0]


@dataclasses.dataclass
class StepResult:
    sampled: np.ndarray | None  # [rows of the batch]; None for a reward model, which samples nothing
    logprobs: np.ndarray
    prompt_logprobs: np.ndarray | None
    token_offsets: list[int]
    top_ids: np.ndarray | None = None  # [rows of the batch, K]: most likely tokens, when the step reports them
    top_logprobs: np.ndarray | None = None
    scores: np.ndarray | None = None  # [rows of the batch, labels]: a reward model's scores


def _step(model, eos_ids, params, kv, last_tokens, ints, floats, image_slab, *, layout, width, decode_only,
          all_logits, penalties, sampling, top_logprobs, constrained):
    """The jitted step: table updates, model, sampler. kv and last_tokens are donated. Returns (kv, last tokens,
    sampled, logprobs, prompt logprobs, top) with top = (ids, logprobs) [R, K] (K = 1, zeros, unless asked).
    A reward model's step samples nothing: its scores [R, labels] come in place of the sampled ids.
    image_slab [rows + 1, hidden] (a vision-language model's image embeddings; None otherwise) replaces the
    embeddings of the tokens with an image row.
    Constrained, it stops before the sampler and returns (kv, last_tokens unchanged, logits, history, prompt
    logprobs, None)."""
    inp = unpack(ints, floats, layout)
    from_device = inp.token_src >= 0
    tokens = jnp.where(from_device, last_tokens[jnp.maximum(inp.token_src, 0)], inp.tokens)  # [T]
    token_kv_rows = inp.kv_rows[inp.token_row]  # [T]
    slot_table = kv.slot_table.at[token_kv_rows, inp.positions].set(inp.write_slots)
    token_table = kv.token_table.at[token_kv_rows, inp.positions].set(tokens)
    meta = AttentionMetadata(
        positions=inp.positions,
        token_req=inp.token_row,
        write_slots=inp.write_slots,
        slot_table=slot_table[inp.kv_rows, :width],  # [R, width]
        context_lens=inp.context_lens,
        query_start=inp.query_start,
        query_lens=inp.query_lens,
        logits_index=inp.logits_index,
        rope_positions=inp.rope_positions,
        decode_only=decode_only,
    )
    images = {}
    if image_slab is not None:
        images = dict(image_embeds=image_slab[jnp.maximum(inp.image_rows, 0)], image_mask=inp.image_rows >= 0)
    logits, layers = model.apply({"params": params}, tokens, meta, kv.layers, all_logits=all_logits, **images)
    if model.config.score_head is not None:  # a reward model: the rows' scores [R, labels], nothing sampled
        new_kv = kv.replace(layers=layers, slot_table=slot_table, token_table=token_table)
        return new_kv, last_tokens, logits, jnp.zeros(logits.shape[:1], jnp.float32), jnp.zeros(tokens.shape), None
    if all_logits:  # logits [T, V]: every position's next-token logprob, then the sampled rows
        all_lp = jax.nn.log_softmax(logits, axis=-1)
        prompt_lp = jnp.take_along_axis(all_lp, inp.target_ids[:, None], axis=-1)[:, 0]
        logits = logits[inp.logits_index]
    else:
        prompt_lp = jnp.zeros(tokens.shape, jnp.float32)
    history = token_table[inp.kv_rows, :width]  # [R, width]
    new_kv = kv.replace(layers=layers, slot_table=slot_table, token_table=token_table)
    if constrained:
        return new_kv, last_tokens, logits, history if penalties else jnp.zeros((1,), jnp.int32), prompt_lp, None
    last, sampled, logprobs, top = _sample_rows(eos_ids, last_tokens, logits, history, inp, None,
                                                penalties=penalties, sampling=sampling, top_logprobs=top_logprobs)
    return new_kv, last, sampled, logprobs, prompt_lp, top


def _sample_rows(eos_ids, last_tokens, logits, history, inp, mask, *, penalties, sampling, top_logprobs):
    """The sampler over the rows' logits [R, V]: (last tokens, sampled [R], logprobs [R], top), top = (ids,
    logprobs) [R, MAX_TOP_LOGPROBS] when `top_logprobs`, else [R, 1] zeros."""
    sampled, logprobs, *top = sample(
        logits, inp.sampling, history, inp.context_lens, eos_ids, penalties=penalties, sampling=sampling,
        mask=mask, top_logprobs=MAX_TOP_LOGPROBS if top_logprobs else 0,
    )
    rows = sampled.shape[0]
    top_lp, top_ids = top[0] if top else (jnp.zeros((rows, 1), jnp.float32), jnp.zeros((rows, 1), jnp.int32))
    last = jnp.zeros_like(last_tokens).at[:rows].set(sampled)
    return last, sampled, logprobs, (top_ids, top_lp)


def _sample_masked(eos_ids, last_tokens, logits, history, ints, floats, mask, *, layout, penalties, sampling,
                   top_logprobs):
    """The second call of a constrained step: the sampler over the model's logits [R, V] with each row's
    allowed-token mask [R, ceil(V / 32)]. last_tokens is donated."""
    inp = unpack(ints, floats, layout)
    return _sample_rows(eos_ids, last_tokens, logits, history, inp, mask, penalties=penalties, sampling=sampling,
                        top_logprobs=top_logprobs)


def _encode_into(model, params, slab, inputs, rows, *, grid):
    """Run the encoder on an `EncodeBatch`'s inputs and write its embeddings [B, T, hidden] into the buffer's
    rows [B, T] (padding outputs write the scratch row). slab is donated."""
    from jaxllm.models.transformer import CausalLM

    features = model.apply({"params": params}, *inputs, grid=grid, method=CausalLM.encode_images)
    return slab.at[rows.reshape(-1)].set(features.reshape(-1, slab.shape[-1]).astype(slab.dtype))


def _fill_tables(kv, rows, positions, slots, tokens):
    """Point table rows at KV computed by earlier requests (prompt-cache prefixes). All args [F] i32."""
    return kv.replace(
        slot_table=kv.slot_table.at[rows, positions].set(slots),
        token_table=kv.token_table.at[rows, positions].set(tokens),
    )


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
        image_rows: int = 0,
    ):
        """image_rows: rows of the image-embedding buffer (a vision-language model's image cache)."""
        self.model = model
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
        kv_shardings = self._init_device_state()
        rep = self._replicated
        self._jitted = jax.jit(
            functools.partial(_step, model, self.eos_ids),
            static_argnames=("layout", "width", "decode_only", "all_logits", "penalties", "sampling",
                             "top_logprobs", "constrained"),
            donate_argnums=(1, 2),
            out_shardings=(kv_shardings, rep, rep, rep, rep, rep),
        )
        # Compiled per shape when first met: steps without constrained rows never call it.
        self._sample_masked = jax.jit(
            functools.partial(_sample_masked, self.eos_ids),
            static_argnames=("layout", "penalties", "sampling", "top_logprobs"),
            donate_argnums=(0,), out_shardings=(rep, rep, rep, rep),
        )
        self.mask_words = (self.vocab_size + 31) // 32  # int32 words of a row's allowed-token mask
        self._fill = jax.jit(_fill_tables, donate_argnums=(0,), out_shardings=kv_shardings)
        # A vision-language model: image embeddings live in one buffer (the image cache's rows + a scratch row);
        # image positions carry key ids past the vocabulary (jaxllm/engine/image_stage.py), sent as the
        # placeholder's id.
        self.image_slab = None
        self._image_token = None
        if model.config.vision is not None and image_rows:
            self._image_token = model.config.vision.image_token_id
            self.image_slab = jax.device_put(np.zeros((image_rows + 1, model.config.hidden_size), model.dtype), rep)
            self._encode = jax.jit(functools.partial(_encode_into, model), static_argnames=("grid",),
                                   donate_argnums=(1,), out_shardings=rep)
        # An M-RoPE model (Qwen2-VL): each token's (temporal, height, width) rotary positions go with the step.
        self._vision = None
        if model.config.rope.mrope_section and model.config.vision is not None:
            from jaxllm.models.vision.registry import vision_family

            self._vision = vision_family(model.config.vision.family)
        # The compiled step of each shape, called directly: on the GPU the jit's own call path costs ~4 ms
        # more host time per step than its compiled executable's (docs/perf.md, session 3).
        self._executables: dict[StepShape, jax.stages.Compiled] = {}
        self.shapes_seen: set[StepShape] = set()  # compiled at start-up or met by a step

    # --- shapes --------------------------------------------------------------------------------
    def shape_of(self, batch: SchedulerOutput) -> StepShape:
        chunks = batch.chunks
        n_tokens = batch.num_tokens
        decode_only = all(c.num_tokens == 1 for c in chunks)  # a member's first sample (no tokens) is not
        if decode_only:
            tokens = rows = pick_bucket(self.row_buckets, len(chunks))
        else:
            tokens = pick_bucket(self.token_buckets, n_tokens)
            rows = self.prefill_rows(tokens, len(chunks))
        width = pick_bucket(self.width_buckets, max(c.start + c.num_tokens for c in chunks))
        params = [c.request.params for c in chunks]
        return StepShape(
            tokens, rows, width, decode_only,
            all_logits=any(c.prompt_logprobs for c in chunks),
            penalties=any(p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty for p in params),
            sampling=any(p.top_k != 1 for p in params),
            top_logprobs=any(c.samples and c.request.top_logprobs_wanted for c in chunks),
            constrained=any(c.samples and c.request.constraint is not None and c.request.constraint.active
                            for c in chunks),
        )

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
        """Every start-up shape, most used first, and how many make the default start-up set: decodes at every
        row count with the narrowest table, prefills of every token bucket and those with more rows than
        _PREFILL_ROWS (the start-up set: every greedy shape when widths are not bucketed), then decodes at
        the wider tables."""
        narrow, *wider = self.width_buckets
        shapes = [StepShape(r, r, narrow, True) for r in self.row_buckets]
        for t in self.token_buckets:
            w = pick_bucket(self.width_buckets, min(t, self.width_buckets[-1]))
            for rows in dict.fromkeys((self.prefill_rows(t), self.prefill_rows(t, self.max_rows))):
                shapes.append(StepShape(t, rows, w, False))
        startup = len(shapes)
        return shapes + [StepShape(r, r, w, True) for w in wider for r in self.row_buckets], startup

    def warmup(self, limit: int | None = None) -> int:
        """Compile the first `limit` start-up shapes (by default the start-up set), several at once; other
        shapes compile when first met. Returns how many were compiled."""
        shapes, startup = self.warmup_shapes()
        shapes = shapes[: startup if limit is None else limit]
        inputs = [self._padding_inputs(shape) for shape in shapes]
        # XLA compiles with the GIL released, so the shapes compile in parallel. Each shape's executable is
        # kept for its first step (no need to run each on padding).
        with ThreadPoolExecutor(max_workers=_compile_threads()) as pool:
            compiled = pool.map(self._compile, inputs, shapes)
            for _ in tqdm(compiled, total=len(shapes), desc="compiling steps", unit="shape", disable=not shapes):
                pass
        return len(shapes)

    def _compile(self, host: StepInputs, shape: StepShape) -> jax.stages.Compiled:
        """The compiled step of `shape` (inputs like `host`), compiled on the first call."""
        self.shapes_seen.add(shape)
        executable = self._executables.get(shape)
        if executable is None:
            ints, floats, layout = pack(host)
            ints, floats = (jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._replicated) for a in (ints, floats))
            executable = self._jitted.lower(
                self.params, self.kv, self._last_tokens, ints, floats, self.image_slab, layout=layout,
                **shape.static_args()
            ).compile()
            self._executables[shape] = executable
        return executable

    # --- steps ---------------------------------------------------------------------------------
    def prepare(self, batch: SchedulerOutput) -> PreparedStep:
        """The host half of a step (`launch` is the other): `batch`'s padded input arrays. Reads the requests
        and touches no device state, so it may run while another thread launches the previous step."""
        started = time.perf_counter()
        shape = self.shape_of(batch)
        fills = [TableFill(c.request, 0, c.cached_prefix) for c in batch.chunks if c.cached_prefix] + batch.fills
        host, offsets, rows = self._prepare(batch, shape)
        prefix_columns = self._table_fills(fills) if fills else None
        return PreparedStep(batch, shape, host, offsets, rows, prefix_columns, started)

    def launch(self, step: PreparedStep, unread: StepHandle | None = None) -> StepHandle:
        """The device half of a step: transfer the inputs and enqueue the compiled step; returns at once (the
        device runs it in the background). Reads no request, so it may run on another thread while the engine
        reads the previous step's results (the call releases the GIL while it enqueues the kernels).
        `unread`: the step before, whose results are not read yet (the handle says whether it had finished:
        the device idled waiting for this launch)."""
        launched = time.perf_counter()
        after_idle = unread is not None and unread.sampled.is_ready()
        if step.prefix_columns is not None:
            self.kv = self._fill(self.kv, *jax.device_put(step.prefix_columns, self._replicated))
        sampled, logprobs, prompt_lp, top, unsampled = self._run(step.host, step.shape)
        launch_s = time.perf_counter() - launched
        if not step.shape.all_logits:
            prompt_lp = None
        if not step.shape.top_logprobs:
            top = None
        for array in (sampled, logprobs, prompt_lp, *(top or ())):
            if array is not None:
                array.copy_to_host_async()
        self._last_rows = step.rows
        return StepHandle(step.batch, sampled, logprobs, prompt_lp, step.offsets, top, unsampled, step.prepared_at,
                          launch_s, after_idle)

    def sample_constrained(self, handle: StepHandle, mask: np.ndarray) -> None:
        """Enqueue a constrained step's sampler with each row's allowed-token mask [rows, mask_words] int32
        (all ones for unconstrained and padding rows); handle.sampled, logprobs (and top) then exist."""
        logits, history, ints, floats, statics = handle.unsampled
        mask = jax.device_put(mask, self._replicated)
        self._last_tokens, handle.sampled, handle.logprobs, top = self._sample_masked(
            self._last_tokens, logits, history, ints, floats, mask, **statics)
        handle.top = top if statics["top_logprobs"] else None
        handle.unsampled = None
        for array in (handle.sampled, handle.logprobs, *(handle.top or ())):
            array.copy_to_host_async()

    def fetch(self, handle: StepHandle) -> StepResult:
        """Wait for a dispatched step's results on the host."""
        n = len(handle.batch.chunks)
        top_ids, top_lp = (np.asarray(a)[:n] for a in handle.top) if handle.top is not None else (None, None)
        rows = np.asarray(handle.sampled)[:n]
        return StepResult(
            sampled=None if self.scoring else rows,
            scores=rows if self.scoring else None,
            logprobs=np.asarray(handle.logprobs)[:n],
            prompt_logprobs=None if handle.prompt_logprobs is None else np.asarray(handle.prompt_logprobs),
            token_offsets=handle.token_offsets,
            top_ids=top_ids,
            top_logprobs=top_lp,
        )

    def _run(self, host: StepInputs, shape: StepShape):
        executable = self._compile(host, shape)
        ints, floats, layout = pack(host)
        ints, floats = jax.device_put((ints, floats), self._replicated)
        self.kv, self._last_tokens, first, second, prompt_lp, top = executable(
            self.params, self.kv, self._last_tokens, ints, floats, self.image_slab
        )
        if not shape.constrained:  # first, second: sampled ids, their logprobs
            return first, second, prompt_lp, top, None
        statics = {"layout": layout, "penalties": shape.penalties, "sampling": shape.sampling,
                   "top_logprobs": shape.top_logprobs}
        return None, None, prompt_lp, None, (first, second, ints, floats, statics)  # first, second: logits, history

    @property
    def image_scratch_row(self) -> int:
        """The image buffer's row that padding outputs write."""
        return self.image_slab.shape[0] - 1

    def encode_images(self, inputs: tuple[np.ndarray, ...], grid: tuple, rows: np.ndarray) -> None:
        """Enqueue one encoder call (an `EncodeBatch`'s inputs and static part) writing its outputs into the image
        buffer's rows [B, T] (padding outputs: `image_scratch_row`)."""
        inputs, rows = jax.device_put((tuple(inputs), np.asarray(rows, np.int32)), self._replicated)
        self.image_slab = self._encode(self.params, self.image_slab, inputs, rows, grid=tuple(grid))

    def _rope_positions(self, req: Request, start: int, stop: int) -> np.ndarray:
        """[3, stop - start] M-RoPE positions of `req`'s positions start..stop (the index on all three axes for
        a request without images)."""
        if not req.images:
            return np.broadcast_to(np.arange(start, stop, dtype=np.int32), (3, stop - start))
        places = [(span.start, span.image.grid) for span in req.images]
        return self._vision.rope_positions(self.model.config, places, start, stop)

    def _model_ids(self, req: Request, ids: list[int]) -> list[int]:
        """`req`'s ids as the model reads them: image key ids → the image placeholder's id."""
        if not req.images:
            return ids
        return [self._image_token if t >= self.vocab_size else t for t in ids]

    def _table_fills(self, fills: list[TableFill]) -> tuple[np.ndarray, ...]:
        """Table entries pointing rows at KV computed for other rows (prompt-cache prefixes, a group's shared
        slots): each fill's positions get the request's slots and token ids; padded to a power of two (≥ 64) of
        entries writing the scratch row. Returns (rows, positions, slots, tokens) for `_fill_tables`, run before
        the step."""
        kv = self.host_kv
        parts = [(np.full(f.stop - f.start, f.request.kv_row), np.arange(f.start, f.stop),
                  f.request.slots[f.start : f.stop], self._model_ids(f.request, f.request.token_ids(f.start, f.stop)))
                 for f in fills]
        count = sum(f.stop - f.start for f in fills)
        size = max(64, 1 << (count - 1).bit_length())
        pad = (np.full(size - count, kv.scratch_row), np.zeros(size - count), np.full(size - count, kv.scratch_slot),
               np.zeros(size - count))
        return tuple(np.concatenate([np.asarray(p[i], np.int32) for p in [*parts, pad]]) for i in range(4))

    def _init_device_state(self):
        kv = self.host_kv
        self.kv, shardings = init_device_kv(
            self.model, kv.num_slots, kv.num_rows, self.width_buckets[-1], self.mesh, self._kv_spec
        )
        self._last_tokens = jax.device_put(np.zeros(self.max_rows, np.int32), self._replicated)
        self._last_rows = {}
        self._sampling_rows: dict[str, tuple] = {}  # request id → (request, its sampling values)
        return shardings

    def device_state_lost(self) -> bool:
        """Whether a failed step consumed the donated buffers."""
        return any(a.is_deleted() for a in jax.tree.leaves((self.kv, self._last_tokens)))

    def reset_device_state(self) -> None:
        """Fresh KV buffers after a failed step consumed them: every request's KV is gone."""
        self._init_device_state()

    def _padding_inputs(self, shape: StepShape) -> StepInputs:
        return self._prepare(SchedulerOutput([], [], "idle"), shape)[0]

    def _sampling(self, batch: SchedulerOutput, pad_rows: int) -> SamplingBatch:
        """The step's SamplingBatch: each request's row (its SamplingBatch.FIELDS values and seed words) is
        computed once, when it first enters a step, and kept while it keeps being scheduled."""
        cache, kept = self._sampling_rows, {}
        rows = []
        for chunk in batch.chunks:
            req = chunk.request
            entry = cache.get(req.request_id)
            if entry is None or entry[0] is not req:
                entry = (req, (*sampling_row(req, self.vocab_size), *seed_words(req.seed)))
            kept[req.request_id] = entry
            rows.append(entry[1])
        self._sampling_rows = kept
        rows += [_PADDING_SAMPLING] * pad_rows
        table = np.array(rows, np.float64)  # [R, fields + 2]: every value is exact in float64
        fields = SamplingBatch.FIELDS
        columns = {name: table[:, k].astype(dtype) for k, (name, dtype) in enumerate(fields)}
        return SamplingBatch(**columns, seed=table[:, len(fields):].astype(np.uint32))

    def _prepare(self, batch: SchedulerOutput, shape: StepShape):
        """Host arrays for `batch` padded to `shape`: padding tokens write the scratch slot and belong to
        padding rows, which read the scratch row with context length 1."""
        if shape.decode_only and batch.chunks:
            return self._prepare_decode(batch, shape)
        kv = self.host_kv
        tokens, src, positions, token_row, write_slots, targets, image_rows = [], [], [], [], [], [], []
        kv_rows, context, q_start, q_lens, logits_index, rope = [], [], [], [], [], []
        offsets: list[int] = []
        rows: dict[str, int] = {}
        last_token: dict[int, int] = {}  # id(request) → packed index of its chunk's last token
        for i, chunk in enumerate(batch.chunks):
            req: Request = chunk.request
            start, n = chunk.start, chunk.num_tokens
            stop = start + n
            q = len(tokens)
            offsets.append(q)
            last_token[id(req)] = q + n - 1
            known = req.num_known
            ids = self._model_ids(req, req.token_ids(start, min(stop, known)))
            tokens += ids
            rows_of_images = req.image_rows(start, stop) if req.images else None
            image_rows += [-1] * n if rows_of_images is None else rows_of_images.tolist()
            src += [-1] * len(ids)
            if stop > known:  # the one token sampled by the previous step, still on the device
                if stop != known + 1 or req.request_id not in self._last_rows:
                    raise RuntimeError(f"request {req.request_id}: position {known} is neither on host nor device")
                tokens.append(0)
                src.append(self._last_rows[req.request_id])
            positions += range(start, stop)
            if self._vision is not None:
                rope.append(self._rope_positions(req, start, stop))
            token_row += [i] * n
            write_slots += req.slots[start:stop]
            if chunk.prompt_logprobs:
                nxt = self._model_ids(req, req.prompt_ids[start + 1 : stop + 1])
                targets += nxt + [0] * (n - len(nxt))
            else:
                targets += [0] * n
            kv_rows.append(req.kv_row)
            context.append(stop)
            q_start.append(q)
            q_lens.append(n)
            logits_index.append(last_token[id(chunk.logits_from)] if chunk.logits_from is not None else q + n - 1)
            if chunk.samples:
                rows[req.request_id] = i
        real_tokens, real_rows = len(tokens), len(batch.chunks)
        pad_tokens, pad_rows = shape.tokens - real_tokens, shape.rows - real_rows
        if pad_tokens < 0 or pad_rows < 0 or (pad_tokens and not pad_rows):
            raise ValueError(f"batch of {real_tokens} tokens, {real_rows} rows does not fit {shape}")
        # Padding token j belongs to padding row min(j, pad_rows - 1).
        pad_owner = [real_rows + min(j, pad_rows - 1) for j in range(pad_tokens)]
        tokens += [0] * pad_tokens
        src += [-1] * pad_tokens
        positions += [0] * pad_tokens
        token_row += pad_owner
        write_slots += [kv.scratch_slot] * pad_tokens
        targets += [0] * pad_tokens
        image_rows += [-1] * pad_tokens
        for r in range(pad_rows):
            first = real_tokens + r if r < pad_tokens else shape.tokens
            count = (1 if r < pad_rows - 1 else pad_tokens - r) if r < pad_tokens else 0
            kv_rows.append(kv.scratch_row)
            context.append(1)
            q_start.append(first)
            q_lens.append(count)
            logits_index.append(min(first, shape.tokens - 1))
        i32 = functools.partial(np.asarray, dtype=np.int32)
        host = StepInputs(
            tokens=i32(tokens), token_src=i32(src), positions=i32(positions), token_row=i32(token_row),
            write_slots=i32(write_slots), target_ids=i32(targets), kv_rows=i32(kv_rows),
            context_lens=i32(context), query_start=i32(q_start), query_lens=i32(q_lens),
            logits_index=i32(logits_index), image_rows=i32(image_rows), sampling=self._sampling(batch, pad_rows),
            rope_positions=None if self._vision is None else np.concatenate(
                rope + [np.zeros((3, pad_tokens), np.int32)], axis=1),
        )
        return host, offsets, rows

    def _prepare_decode(self, batch: SchedulerOutput, shape: StepShape):
        """`_prepare` for a step of one token per row (tokens = rows = shape.rows): the same arrays, built
        from one tuple of scalars per row; padding row r holds padding token r."""
        kv, last_rows = self.host_kv, self._last_rows
        n, size = len(batch.chunks), shape.rows
        if size < n or shape.tokens != size:
            raise ValueError(f"batch of {n} rows does not fit {shape}")
        per_row, rows = [], {}
        image_rows = np.full(size, -1, np.int32)
        rope = np.zeros((3, size), np.int32) if self._vision is not None else None
        for i, chunk in enumerate(batch.chunks):
            req: Request = chunk.request
            pos = chunk.start
            known = req.num_known
            if req.images and pos < req.images[-1].stop:  # a one-token prompt chunk may fall on an image
                image_row = req.image_rows(pos, pos + 1)
                if image_row is not None:
                    image_rows[i] = image_row[0]
            if pos < known:
                token, src = self._model_ids(req, req.token_ids(pos, pos + 1))[0], -1
            elif pos == known and req.request_id in last_rows:
                token, src = 0, last_rows[req.request_id]
            else:
                raise RuntimeError(f"request {req.request_id}: position {known} is neither on host nor device")
            target = 0
            if chunk.prompt_logprobs and pos + 1 < len(req.prompt_ids):
                target = self._model_ids(req, [req.prompt_ids[pos + 1]])[0]
            per_row.append((token, src, pos, req.slots[pos], target, req.kv_row))
            if self._vision is not None and req.images:
                rope[:, i] = self._rope_positions(req, pos, pos + 1)[:, 0]
            if chunk.samples:
                rows[req.request_id] = i
        real = np.array(per_row, np.int64).reshape(n, 6)
        column = np.zeros((6, size), np.int32)  # tokens, src, positions, write_slots, targets, kv_rows
        column[:, :n] = real.T
        column[1, n:] = -1
        column[3, n:] = kv.scratch_slot
        column[5, n:] = kv.scratch_row
        index = np.arange(size, dtype=np.int32)  # token i is row i's only token
        context = np.ones(size, np.int32)
        context[:n] = column[2, :n] + 1
        if rope is not None:  # text-only rows: the index on all three axes
            text = np.array([not c.request.images for c in batch.chunks] + [False] * (size - n))
            rope[:, text] = column[2, text]
        host = StepInputs(
            tokens=column[0], token_src=column[1], positions=column[2], token_row=index,
            write_slots=column[3], target_ids=column[4], kv_rows=column[5], context_lens=context,
            query_start=index.copy(), query_lens=np.ones(size, np.int32), logits_index=index.copy(),
            image_rows=image_rows, sampling=self._sampling(batch, size - n), rope_positions=rope,
        )
        return host, list(range(n)), rows
