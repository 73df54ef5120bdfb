"""The engine core's fast host paths give what the general ones give: a decode step's plain events
(EventMaker.plain_tokens) equal `EventMaker.token`'s for the rows they take and leave every other row alone; a
table row's sampling values and shape flags (RowValues) follow the request that holds the row."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxllm.engine.events import EventMaker
from jaxllm.engine.group import SequenceGroup
from jaxllm.engine.request import Request, RequestStatus, SamplingParams
from jaxllm.engine.row_values import RowValues
from jaxllm.engine.sampler import sampling_row, seed_words
from jaxllm.engine.scheduler import ScheduledChunk, SchedulerOutput

VOCAB = 49152  # SmolLM2's


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _request(rng, i: int, params: SamplingParams, outputs: int) -> Request:
    req = Request(str(i), rng.integers(100, 5000, int(rng.integers(3, 12))).tolist(), params.normalized(),
                  seed=int(rng.integers(2**63)), arrival=i, status=RequestStatus.RUNNING)
    return req, rng.integers(100, 5000, outputs).tolist()


def test_plain_tokens_match_token_for_the_rows_they_take(tokenizer):
    rng = np.random.default_rng(7)
    eos = tokenizer.eos_token_id
    special = next(t for t in tokenizer.all_special_ids if t != eos)
    maker = EventMaker(tokenizer, [eos], text_elsewhere=True)
    plain = SamplingParams(max_new_tokens=12)
    cases = [  # (params, outputs so far, sampled token or None for a random one, taken)
        (plain, 3, None, True), (plain, 7, None, True), (plain, 0, None, False),  # a first token: its extras
        (plain, 11, None, False), (plain, 10, None, True),  # the 12th output is its last ("length")
        (plain, 4, eos, False), (plain, 4, special, False),
        (SamplingParams(max_new_tokens=12, ignore_eos=True), 5, None, True),
        (SamplingParams(max_new_tokens=12, stop_sequences=("zz",)), 3, None, False),  # text made in the engine
        (SamplingParams(max_new_tokens=12, top_logprobs=2), 3, None, False),
        (plain, 3, None, False),  # a group's sequence (below)
    ]
    reqs, sampled = [], []
    for i, (params, outputs, token, _) in enumerate(cases):
        req, previous = _request(rng, i, params, outputs)
        maker.attach(req)
        req.output_ids, req.output_logprobs = previous, (-rng.random(outputs)).tolist()
        reqs.append(req)
        sampled.append(int(rng.integers(100, 5000)) if token is None else token)
    twin = copy.deepcopy(reqs[-1])
    SequenceGroup([reqs[-1], twin])
    sampled, logprobs = np.array(sampled, np.int32), -rng.random(len(reqs)).astype(np.float32)
    general = copy.deepcopy(reqs)

    taken, token_ids, token_lps, counts, prompt_tokens = maker.plain_tokens(reqs, sampled, logprobs)
    assert taken == [case[3] for case in cases]
    events = [maker.token(req, int(t), float(lp)) for req, t, lp, took in zip(general, sampled, logprobs, taken)
              if took]
    assert token_ids == [e.token_id for e in events] and token_lps == [e.logprob for e in events]
    assert counts == [e.count_output_tokens for e in events] and prompt_tokens == [e.prompt_tokens for e in events]
    assert all(e.text is None and not (e.finished or e.special or e.queue_s is not None) for e in events)
    # Rows taken: the same output as the general path's; the others: untouched (their copies were not read).
    assert [(r.output_ids, r.output_logprobs) for r in reqs] == [(r.output_ids, r.output_logprobs) for r in general]


def test_row_values_follow_the_request_that_holds_the_row():
    rng = np.random.default_rng(3)
    values = RowValues(num_rows=4, vocab_size=VOCAB)
    first, _ = _request(rng, 0, SamplingParams(do_sample=True, temperature=0.7, top_k=20, logit_bias={4: 2.5}), 0)
    second, _ = _request(rng, 1, SamplingParams(repetition_penalty=1.3, top_logprobs=3), 0)
    greedy, _ = _request(rng, 2, SamplingParams(), 0)
    first.kv_row, greedy.kv_row = 2, 0

    def step(*reqs):
        return SchedulerOutput([ScheduledChunk(r, 0, 1, decode=True) for r in reqs], [], "decode")

    def expected(reqs, pad):
        return np.array([(*sampling_row(r, VOCAB), *seed_words(r.seed)) for r in reqs]
                        + [(1.0, 1.0, 1, 1.0, 0.0, 0.0, 0, 1.0, 1, 0, 0, 1.0, 0, 0)] * pad)

    def gathered(batch):
        sb = values.sampling(values.rows_of(batch), 2)
        columns = [getattr(sb, name) for name, _ in sb.FIELDS]
        return np.column_stack([*columns, sb.seed])

    batch = step(first, greedy)
    np.testing.assert_allclose(gathered(batch), expected([first, greedy], 2), rtol=1e-6)
    assert values.shape_flags(batch, values.rows_of(batch)) == {
        "penalties": False, "sampling": True, "top_logprobs": False, "constrained": False, "typical": False,
        "bias": 8}
    biased = values.sampling(values.rows_of(batch), 2, 8)  # first's one bias in its row, zeros elsewhere
    assert biased.bias_ids[0, 0] == 4 and biased.bias_values[0, 0] == 2.5 and not biased.bias_values[1:].any()
    second.kv_row = 2  # row 2 changes hands: its values and flags are the new holder's
    batch = step(greedy, second)
    np.testing.assert_allclose(gathered(batch), expected([greedy, second], 2), rtol=1e-6)
    assert values.shape_flags(batch, values.rows_of(batch)) == {
        "penalties": True, "sampling": False, "top_logprobs": True, "constrained": False, "typical": False,
        "bias": 0}
