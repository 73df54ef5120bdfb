"""The step values of each request row that stay the same while one request holds the row: its sampling values and
seed words, and which of the sampler's costlier paths it needs. Kept in per-row numpy tables and refreshed only
where a row changed hands, so that a step gathers its rows' values instead of rebuilding them request by request."""

from __future__ import annotations

import numpy as np

from jaxllm.engine.request import Request
from jaxllm.engine.sampler import PADDING_ROW, SamplingBatch, sampling_row, seed_words
from jaxllm.engine.scheduler import SchedulerOutput

_PADDING_VALUES = (*PADDING_ROW, 0, 0)  # a padding row's sampling values and seed words
# Columns of the flags table: a penalty, a non-greedy draw, top logprobs wanted, a constraint (maybe active),
# a typical_p cut.
_PENALTIES, _SAMPLING, _TOP_LOGPROBS, _CONSTRAINED, _TYPICAL = range(5)


class RowValues:
    """Per table row (`num_rows` request rows and the scratch row that padding reads): the values of the request
    that holds it, filled when that request first appears in a step in that row."""

    def __init__(self, num_rows: int, vocab_size: int):
        self.vocab_size = vocab_size
        self.scratch_row = num_rows
        self._values = np.zeros((num_rows + 1, len(SamplingBatch.FIELDS) + 2), np.float64)  # every value exact
        self._values[num_rows] = _PADDING_VALUES
        self._flags = np.zeros((num_rows + 1, 5), bool)
        self._owners: list[Request | None] = [None] * (num_rows + 1)  # whose values each row holds
        self._bias: list[tuple] = [()] * (num_rows + 1)  # each row's logit_bias pairs
        self._bias_len = np.zeros(num_rows + 1, np.int64)  # their lengths, for a step's maximum without a loop

    def reset(self) -> None:
        """Forget every row's owner (the values are refilled when next met)."""
        self._owners = [None] * len(self._owners)

    def rows_of(self, batch: SchedulerOutput) -> np.ndarray:
        """[len(batch.chunks)] i64: each chunk's table row, the row's values refreshed where it changed hands."""
        owners = self._owners
        rows = [chunk.request.kv_row for chunk in batch.chunks]
        for row, chunk in zip(rows, batch.chunks):
            if owners[row] is not chunk.request:
                self._fill(row, chunk.request)
        return np.array(rows, np.int64)

    def _fill(self, row: int, req: Request) -> None:
        p = req.params
        self._values[row] = (*sampling_row(req, self.vocab_size), *seed_words(req.seed))
        self._flags[row] = (p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty, p.top_k != 1,
                            req.top_logprobs_wanted > 0, req.constraint is not None, p.typical_p < 1)
        self._owners[row] = req
        self._bias[row] = p.logit_bias
        self._bias_len[row] = len(p.logit_bias)

    def sampling(self, rows: np.ndarray, pad_rows: int, bias_width: int = 0) -> SamplingBatch:
        """The SamplingBatch of a step whose rows are `rows` (rows_of), then `pad_rows` padding rows; with
        `bias_width` (StepShape.bias) columns of logit_bias."""
        table = self._values[np.concatenate([rows, np.full(pad_rows, self.scratch_row, np.int64)])]
        fields = SamplingBatch.FIELDS
        columns = {name: table[:, k].astype(dtype) for k, (name, dtype) in enumerate(fields)}
        if bias_width:
            ids = np.zeros((len(table), bias_width), np.int32)
            values = np.zeros((len(table), bias_width), np.float32)
            for i in np.flatnonzero(self._bias_len[rows]).tolist():
                pairs = self._bias[rows[i]]
                ids[i, : len(pairs)], values[i, : len(pairs)] = zip(*pairs)
            columns.update(bias_ids=ids, bias_values=values)
        return SamplingBatch(**columns, seed=table[:, len(fields):].astype(np.uint32))

    def bias_width(self, rows: np.ndarray) -> int:
        """Columns of logit_bias a step of `rows` needs: 0, or a power of two from 8 up holding every row's."""
        most = int(self._bias_len[rows].max(initial=0))
        return 0 if most == 0 else max(8, 1 << (most - 1).bit_length())

    def shape_flags(self, batch: SchedulerOutput, rows: np.ndarray) -> dict:
        """StepShape's sampler switches for a step of `batch` whose rows are `rows` (rows_of): penalties, sampling,
        top_logprobs (a sampled row reports its most likely tokens), constrained (a sampled row's constraint is
        active), typical (a row's draw takes the typical_p cut)."""
        flags = self._flags[rows]  # [n, 5]
        chunks = batch.chunks
        sampled = slice(None) if batch.kind == "decode" else np.array([c.samples for c in chunks], bool)
        constrained = False
        for i in np.flatnonzero(flags[:, _CONSTRAINED]).tolist():
            chunk = chunks[i]
            if chunk.samples and chunk.request.constraint.active:
                constrained = True
                break
        return {"penalties": bool(flags[:, _PENALTIES].any()), "sampling": bool(flags[:, _SAMPLING].any()),
                "top_logprobs": bool(flags[sampled, _TOP_LOGPROBS].any()), "constrained": constrained,
                "typical": bool(flags[:, _TYPICAL].any()), "bias": self.bias_width(rows)}
