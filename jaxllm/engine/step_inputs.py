"""One step's inputs, built on the host from the scheduler's output: StepInputs (padded numpy arrays) and, with the
static StepShape and the table fills, the DeviceStep — everything a device step reads, self-contained (no request
objects), so that process 0 can send it to the other processes of a multi-process deployment. `pack` puts a
step's arrays in one int32 buffer: one host-to-device transfer per device per step instead of two dozen."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable

import jax
import numpy as np
from flax import struct

from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.request import Request
from jaxllm.engine.row_values import RowValues
from jaxllm.engine.sampler import SamplingBatch
from jaxllm.engine.scheduler import SchedulerOutput, TableFill
from jaxllm.engine.step_shapes import StepShape


@struct.dataclass
class StepInputs:
    """One step's host-prepared arrays, padded: T tokens (packed rows), R rows."""

    tokens: jax.Array  # [T] i32: host-known ids (0 where the id comes from the device)
    token_src: jax.Array  # [T] i32: -1, or the row of the previous step whose sampled id is this token
    positions: jax.Array  # [T] i32
    token_row: jax.Array  # [T] i32: the token's row in this step
    write_slots: jax.Array  # [T] i32: KV slot written (the scratch slot for padding)
    target_ids: jax.Array  # [T] i32: next prompt id, for prompt logprobs
    kv_rows: jax.Array  # [R] i32: each row's row of the device tables (the scratch row for padding)
    context_lens: jax.Array  # [R] i32
    query_start: jax.Array  # [R] i32
    query_lens: jax.Array  # [R] i32
    logits_index: jax.Array  # [R] i32
    image_rows: jax.Array  # [T] i32: the token's row of the image-embedding buffer, -1 for a text token
    # [1] i32: where the step's sampled rows go in the device's last-token array: 0, or past the rows holding the
    # tokens of requests that decode in other steps (a prefill admitted while they decode: `carry_base`)
    last_base: jax.Array
    sampling: SamplingBatch
    rope_positions: jax.Array | None = None  # [3, T] i32: an M-RoPE model's rotary positions (t, h, w)


@dataclasses.dataclass(frozen=True)
class DeviceStep:
    """Everything one step's device work reads: the compiled step's key, its inputs and the table entries to
    write first (prompt-cache prefixes, a group's shared slots: rows, positions, slots, tokens, each [F] i32)."""

    shape: StepShape
    inputs: StepInputs
    table_fills: tuple[np.ndarray, ...] | None

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays (what crosses to another process, besides a few bytes of shape)."""
        return sum(a.nbytes for a in jax.tree.leaves((self.inputs, self.table_fills)))


def pack(host: StepInputs):
    """All of a step's host arrays in one int32 buffer (float leaves as float32 bit patterns): one transfer per
    device instead of one per array (each transfer costs host time per device under --tp). Returns (words,
    layout); `layout` (static) lets the step unpack them."""
    leaves, treedef = jax.tree.flatten(host)
    words = [(a.astype(np.float32) if a.dtype.kind == "f" else a).view(np.int32).ravel() for a in leaves]
    layout = (treedef, tuple((a.shape, a.dtype.str) for a in leaves))
    return np.concatenate(words), layout


def unpack(words, layout) -> StepInputs:
    """Inside the step: the StepInputs that `pack` flattened (float leaves come back as float32)."""
    treedef, specs = layout
    leaves, at = [], 0
    for shape, dtype in specs:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape))
        leaf = words[at : at + size].reshape(shape)
        at += size
        if dtype.kind == "f":
            dtype = np.dtype(np.float32)
        leaves.append(leaf if dtype == np.int32 else jax.lax.bitcast_convert_type(leaf, dtype))
    return jax.tree.unflatten(treedef, leaves)


class StepInputBuilder:
    """Builds each scheduled step's StepInputs from its requests. Remembers which row of the last launched step
    sampled each request (its next token is still on the device) and each table row's sampling values (`row_values`)."""

    def __init__(self, kv: KVCache, vocab_size: int, image_token: int | None = None, rope: Callable | None = None):
        """image_token: a vision-language model's placeholder id, which the model reads at image positions (the
        requests' prompts carry image key ids there, past the vocabulary: jaxllm/engine/image_stage.py).
        rope: an M-RoPE model's `rope(images, start, stop)` → [3, stop - start] rotary positions of a request's
        positions start..stop from its images' (first position, grid) (the vision family's `rope_positions`)."""
        self.host_kv = kv
        self.vocab_size = vocab_size
        self.image_token = image_token
        self.rope = rope
        self.row_values = RowValues(kv.num_rows, vocab_size)
        self.reset()

    def _rope_positions(self, req: Request, start: int, stop: int) -> np.ndarray:
        """[3, stop - start] M-RoPE positions of `req`'s positions start..stop (the index on all three axes for
        a request without images)."""
        if not req.images:
            return np.broadcast_to(np.arange(start, stop, dtype=np.int32), (3, stop - start))
        return self.rope([(span.start, span.image.grid) for span in req.images], start, stop)

    def _model_ids(self, req: Request, ids: list[int]) -> list[int]:
        """`req`'s ids as the model reads them: image key ids → the image placeholder's id."""
        if not req.images:
            return ids
        return [self.image_token if t >= self.vocab_size else t for t in ids]

    def reset(self) -> None:
        """Forget the device's sampled rows (its state was lost) and the cached sampling values."""
        self._last_rows: dict[str, int] = {}
        self._before_last: dict[str, int] = {}
        self.row_values.reset()

    def launched(self, rows: dict[str, int], carried: bool = False) -> None:
        """A step is to launch next (steps launch in the order they are staged, ModelRunner.stage): `rows` maps
        each request it samples to its row of the device's last-token array (its token stays on the device, for
        the step after it). `carried`: the step wrote past the rows of the steps before (`carry_base`), whose
        requests' tokens stay where they are."""
        self._before_last = self._last_rows
        self._last_rows = {**self._last_rows, **rows} if carried else rows

    def unlaunch(self) -> None:
        """The step last passed to `launched` will not launch (the prefill before it failed): the rows before it
        hold the tokens again."""
        self._last_rows = self._before_last

    def carry_base(self, batch: SchedulerOutput, capacity: int) -> int:
        """Where a prefill admitted while other requests decode puts its sampled rows in the device's last-token
        array (`capacity` rows): past the rows holding the other requests' tokens, so that the decode step after
        it can be prepared before it launches (step_loop.py's looking ahead) and take tokens from both. 0 (the
        rows before are overwritten) for every other step, or where they would not fit."""
        if batch.kind != "prefill" or batch.decodes_all or not self._last_rows:
            return 0
        base = max(self._last_rows.values()) + 1
        return base if base + len(batch.chunks) <= capacity else 0

    def padding(self, shape: StepShape) -> StepInputs:
        """The inputs of a step of `shape` with padding only."""
        return self.build(SchedulerOutput([], [], "idle"), shape)[0]

    def table_fills(self, fills: list[TableFill]) -> tuple[np.ndarray, ...]:
        """Table entries pointing rows at KV computed for other rows (prompt-cache prefixes, a group's shared
        slots): each fill's positions get the request's slots and token ids; padded to a power of two (≥ 64) of
        entries writing the scratch row. Returns (rows, positions, slots, tokens) for `device_steps.fill_tables`,
        run before the step."""
        kv = self.host_kv
        parts = [(np.full(f.stop - f.start, f.request.kv_row), np.arange(f.start, f.stop),
                  f.request.slots[f.start : f.stop], self._model_ids(f.request, f.request.token_ids(f.start, f.stop)))
                 for f in fills]
        count = sum(f.stop - f.start for f in fills)
        size = max(64, 1 << (count - 1).bit_length())
        pad = (np.full(size - count, kv.scratch_row), np.zeros(size - count), np.full(size - count, kv.scratch_slot),
               np.zeros(size - count))
        return tuple(np.concatenate([np.asarray(p[i], np.int32) for p in [*parts, pad]]) for i in range(4))

    def build(self, batch: SchedulerOutput, shape: StepShape, table_rows: np.ndarray | None = None,
              last_base: int = 0):
        """Host arrays for `batch` padded to `shape`: padding tokens write the scratch slot and belong to
        padding rows, which read the scratch row with context length 1. `table_rows`: each chunk's table row
        (`row_values.rows_of(batch)`, when the caller has them); `last_base`: `carry_base`. Returns (StepInputs,
        each chunk's first index in the packed tokens, request id → its row of the device's last-token array for
        the requests the step samples)."""
        if table_rows is None:
            table_rows = self.row_values.rows_of(batch)
        if shape.decode_only and batch.chunks:
            return self._build_decode(batch, shape, table_rows, last_base)
        kv = self.host_kv
        chunks = batch.chunks
        real_rows = len(chunks)
        # Only the ids and slots come as Python lists (each chunk's n tokens: its known ids, then the device's one
        # where its last position is still there); the other per-token arrays are filled from each chunk's
        # (start, length) in a few array operations (a prefill of 64 × 128 tokens: 2.4 ms of lists before).
        tokens: list[int] = []
        write_slots: list[int] = []
        on_device: list[tuple[int, int]] = []  # (packed index, row of the last-token array)
        targets_of: list[tuple[int, list[int]]] = []  # (packed index of the chunk, its next prompt ids)
        images_of: list[tuple[int, np.ndarray]] = []  # (packed index of the chunk, its image rows)
        rope, offsets, logits_index = [], [], []
        rows: dict[str, int] = {}
        last_token: dict[int, int] = {}  # id(request) → packed index of its chunk's last token
        for i, chunk in enumerate(chunks):
            req: Request = chunk.request
            start, n = chunk.start, chunk.num_tokens
            stop = start + n
            q = len(tokens)
            offsets.append(q)
            last_token[id(req)] = q + n - 1
            known = req.num_known
            tokens += self._model_ids(req, req.token_ids(start, min(stop, known)))
            if req.images:
                rows_of_images = req.image_rows(start, stop)
                if rows_of_images is not None:
                    images_of.append((q, rows_of_images))
            # The one token sampled by the previous step, still on the device (looking ahead, the one before it
            # may not be read yet either: its position's KV is computed, so only the last token is an input).
            if stop > known:
                if stop - max(start, known) != 1 or req.request_id not in self._last_rows:
                    raise RuntimeError(f"request {req.request_id}: position {known} is neither on host nor device")
                on_device.append((len(tokens), self._last_rows[req.request_id]))
                tokens.append(0)
            if self.rope is not None:
                rope.append(self._rope_positions(req, start, stop))
            write_slots += req.slots[start:stop]
            if chunk.prompt_logprobs:
                targets_of.append((q, self._model_ids(req, req.prompt_ids[start + 1 : stop + 1])))
            logits_index.append(last_token[id(chunk.logits_from)] if chunk.logits_from is not None else q + n - 1)
            if chunk.samples:
                rows[req.request_id] = last_base + i
        real_tokens = len(tokens)
        pad_tokens, pad_rows = shape.tokens - real_tokens, shape.rows - real_rows
        if pad_tokens < 0 or pad_rows < 0 or (pad_tokens and not pad_rows):
            raise ValueError(f"batch of {real_tokens} tokens, {real_rows} rows does not fit {shape}")
        lens = np.fromiter((c.num_tokens for c in chunks), np.int32, real_rows)
        starts = np.fromiter((c.start for c in chunks), np.int32, real_rows)
        q_start = np.asarray(offsets, np.int32)
        ids = np.zeros(shape.tokens, np.int32)
        ids[:real_tokens] = tokens
        src = np.full(shape.tokens, -1, np.int32)
        for index, row in on_device:
            src[index] = row
        positions = np.zeros(shape.tokens, np.int32)
        positions[:real_tokens] = np.arange(real_tokens, dtype=np.int32) + np.repeat(starts - q_start, lens)
        # Padding token j belongs to padding row min(j, pad_rows - 1).
        token_row = np.concatenate((np.repeat(np.arange(real_rows, dtype=np.int32), lens),
                                    real_rows + np.minimum(np.arange(pad_tokens, dtype=np.int32), pad_rows - 1)))
        slots = np.full(shape.tokens, kv.scratch_slot, np.int32)
        slots[:real_tokens] = write_slots
        targets = np.zeros(shape.tokens, np.int32)
        for q, nxt in targets_of:
            targets[q : q + len(nxt)] = nxt
        image_rows = np.full(shape.tokens, -1, np.int32)
        for q, image in images_of:
            image_rows[q : q + len(image)] = image
        kv_rows = [c.request.kv_row for c in chunks]
        context = (starts + lens).tolist()
        q_starts, q_lens = q_start.tolist(), lens.tolist()
        for r in range(pad_rows):
            first = real_tokens + r if r < pad_tokens else shape.tokens
            count = (1 if r < pad_rows - 1 else pad_tokens - r) if r < pad_tokens else 0
            kv_rows.append(kv.scratch_row)
            context.append(1)
            q_starts.append(first)
            q_lens.append(count)
            logits_index.append(min(first, shape.tokens - 1))
        i32 = functools.partial(np.asarray, dtype=np.int32)
        host = StepInputs(
            tokens=ids, token_src=src, positions=positions, token_row=token_row,
            write_slots=slots, target_ids=targets, kv_rows=i32(kv_rows),
            context_lens=i32(context), query_start=i32(q_starts), query_lens=i32(q_lens),
            logits_index=i32(logits_index), image_rows=image_rows, last_base=i32([last_base]),
            sampling=self.row_values.sampling(table_rows, pad_rows, shape.bias),
            rope_positions=None if self.rope is None else np.concatenate(
                rope + [np.zeros((3, pad_tokens), np.int32)], axis=1),
        )
        return host, offsets, rows

    def _build_decode(self, batch: SchedulerOutput, shape: StepShape, table_rows: np.ndarray, last_base: int = 0):
        """`build` for a step of one token per row (tokens = rows = shape.rows), column by column; padding row r
        holds padding token r. A row's token is the one its request sampled in the last launched step (still on
        the device) unless the host has read it; rows with images or a prompt logprob are completed one by one."""
        kv = self.host_kv
        chunks = batch.chunks
        n, size = len(chunks), shape.rows
        if size < n or shape.tokens != size:
            raise ValueError(f"batch of {n} rows does not fit {shape}")
        reqs = [c.request for c in chunks]
        positions = np.fromiter((c.start for c in chunks), np.int64, n)
        known = np.fromiter((r.num_known for r in reqs), np.int64, n)
        src = np.fromiter(map(self._last_rows.get, [r.request_id for r in reqs], itertools.repeat(-1)), np.int64, n)
        on_host = positions < known
        lost = ~on_host & (src < 0)  # not read yet, nor sampled by the previous step
        if lost.any():
            i = int(np.flatnonzero(lost)[0])
            raise RuntimeError(f"request {reqs[i].request_id}: position {known[i]} is neither on host nor device")
        column = np.zeros((6, size), np.int32)  # tokens, src, positions, write_slots, targets, kv_rows
        column[1], column[3], column[5] = -1, kv.scratch_slot, kv.scratch_row
        column[1, :n] = np.where(on_host, -1, src)
        column[2, :n] = positions
        column[3, :n] = [r.slots[p] for r, p in zip(reqs, positions.tolist())]
        column[5, :n] = table_rows
        for i in np.flatnonzero(on_host).tolist():
            req, pos = reqs[i], chunks[i].start
            column[0, i] = self._model_ids(req, req.token_ids(pos, pos + 1))[0]
        image_rows = np.full(size, -1, np.int32)
        rope = None
        if self.rope is not None:  # text rows: the index on all three axes
            rope = np.zeros((3, size), np.int32)
            rope[:, :n] = column[2, :n]
        for i in [i for i, c in enumerate(chunks) if c.prompt_logprobs or c.request.images]:
            req, pos = reqs[i], chunks[i].start
            if req.images and pos < req.images[-1].stop:  # a one-token prompt chunk may fall on an image
                image_row = req.image_rows(pos, pos + 1)
                if image_row is not None:
                    image_rows[i] = image_row[0]
            if chunks[i].prompt_logprobs and pos + 1 < len(req.prompt_ids):
                column[4, i] = self._model_ids(req, [req.prompt_ids[pos + 1]])[0]
            if rope is not None and req.images:
                rope[:, i] = self._rope_positions(req, pos, pos + 1)[:, 0]
        index = np.arange(size, dtype=np.int32)  # token i is row i's only token
        context = np.ones(size, np.int32)
        context[:n] = column[2, :n] + 1
        host = StepInputs(
            tokens=column[0], token_src=column[1], positions=column[2], token_row=index,
            write_slots=column[3], target_ids=column[4], kv_rows=column[5], context_lens=context,
            query_start=index.copy(), query_lens=np.ones(size, np.int32), logits_index=index.copy(),
            image_rows=image_rows, last_base=np.asarray([last_base], np.int32),
            sampling=self.row_values.sampling(table_rows, size - n, shape.bias),
            rope_positions=rope,
        )
        rows = {r.request_id: last_base + i for i, (r, c) in enumerate(zip(reqs, chunks)) if c.samples}
        return host, list(range(n)), rows
