"""SamplingParams: LightLLM's normalisation and validation; Request's token bookkeeping."""

import pytest

from jaxllm.engine.request import Request, SamplingParams


def test_do_sample_false_or_tiny_temperature_is_greedy():
    assert SamplingParams(temperature=0.3, top_p=0.5, top_k=7).normalized() == SamplingParams(
        temperature=1.0, top_p=1.0, top_k=1
    )
    tiny = SamplingParams(do_sample=True, temperature=0.0, top_k=9).normalized()
    assert (tiny.temperature, tiny.top_p, tiny.top_k) == (1.0, 1.0, 1)
    sampled = SamplingParams(do_sample=True, temperature=0.7, top_k=9)
    assert sampled.normalized() is sampled and not sampled.greedy
    assert SamplingParams().greedy and SamplingParams(do_sample=True, temperature=0).greedy


def test_json_shaped_values_are_accepted():
    p = SamplingParams(stop_sequences=["a", "b"], exponential_decay_length_penalty=[3, 1.2])
    assert p.stop_sequences == ("a", "b") and p.exponential_decay_length_penalty == (3, 1.2)
    assert SamplingParams(stop_sequences="x").stop_sequences == ("x",)
    assert SamplingParams(stop_sequences=None).stop_sequences == ()


@pytest.mark.parametrize(
    "field, value",
    [
        ("best_of", 9), ("n", 2), ("presence_penalty", -0.1), ("frequency_penalty", -1.0),
        ("repetition_penalty", 0.9), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.01), ("top_k", 0),
        ("max_new_tokens", 0), ("min_new_tokens", 0), ("min_new_tokens", 17),
        ("exponential_decay_length_penalty", (1, 0.5)), ("exponential_decay_length_penalty", (-1, 1.0)),
        ("stop_sequences", ("",)), ("seed", 1.5),
    ],
)
def test_each_invalid_value_is_named(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(do_sample=True, **{field: value}).validate()


def test_valid_values_pass():
    SamplingParams(best_of=3, n=3, do_sample=True, temperature=0.5, top_p=0.9, top_k=40, max_new_tokens=5,
                   min_new_tokens=5, repetition_penalty=1.2, exponential_decay_length_penalty=(0, 1.5),
                   seed=-3).validate()


def test_request_positions_span_prompt_then_outputs():
    req = Request("r", [10, 11, 12], SamplingParams(max_new_tokens=4), seed=0, arrival=0)
    req.output_ids += [20, 21]
    req.num_pending = 1
    assert (req.num_known, req.num_tokens, req.num_output) == (5, 6, 3)
    assert req.token_ids(1, 5) == [11, 12, 20, 21]
    assert req.token_ids(3, 4) == [20] and req.token_ids(0, 2) == [10, 11]
    assert req.wants_token
    req.num_pending = 2
    assert not req.wants_token
