"""Request checking without an engine: JSON bodies, field types, LightLLM's parameter schema and the
normalise-then-validate order of SamplingParams, error bodies and SSE framing."""

import json

import pytest

from jaxllm.server.errors import ApiError, lightllm_error_body, openai_error_body, tgi_error_body
from jaxllm.engine.group import member_params
from jaxllm.server.jsonio import LOGPROB_FLOOR, finite_logprob, parse_json
from jaxllm.server.sse import event
from jaxllm.server.validation import LIGHTLLM_PARAMETERS, read_fields, sampling_params


def lightllm(parameters: dict):
    return sampling_params(read_fields(parameters, LIGHTLLM_PARAMETERS, "parameters"))


def error_of(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize("raw, fragment", [
    (b"", "empty"),
    (b"{\"inputs\": ", "malformed JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"{\"a\": NaN}", "NaN is not a valid JSON number"),
    (b"{\"a\": -Infinity}", "-Infinity"),
    (b"{\"inputs\": \"\\ud800\"}", "inputs: invalid Unicode"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_bad_bodies_are_400_naming_the_problem(raw, fragment):
    err = error_of(parse_json, raw)
    assert err.status == 400 and fragment in err.message


def test_good_body_keeps_unicode():
    assert parse_json('{"inputs": "日本 🙂", "n": 1.5}'.encode()) == {"inputs": "日本 🙂", "n": 1.5}


def test_defaults_are_lightllm_defaults_and_greedy():
    p = lightllm({})
    assert (p.best_of, p.n, p.max_new_tokens, p.min_new_tokens, p.top_k, p.stop_sequences) == (1, 1, 16, 1, 1, ())
    assert p.greedy and p.temperature == 1.0 and p.top_p == 1.0


def test_do_sample_false_overrides_sampling_fields_before_validation():
    # LightLLM normalises first, so temperature 0 and top_p 5 are fine when greedy.
    p = lightllm({"do_sample": False, "temperature": 0, "top_p": 5.0, "top_k": 0})
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 1)


def test_tiny_temperature_means_greedy():
    assert lightllm({"do_sample": True, "temperature": 1e-6}).greedy
    assert not lightllm({"do_sample": True, "temperature": 0.7, "top_k": 5}).greedy


def test_n_defaults_to_best_of():
    p = lightllm({"best_of": 3, "do_sample": True})
    assert (p.best_of, p.n) == (3, 3)


@pytest.mark.parametrize("parameters, field", [
    ({"best_of": 9}, "best_of"),
    ({"best_of": 2, "n": 1}, "n"),
    ({"presence_penalty": -0.1}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"repetition_penalty": 0.9}, "repetition_penalty"),
    ({"do_sample": True, "temperature": -1.0}, "temperature"),
    ({"do_sample": True, "top_p": 0.0}, "top_p"),
    ({"do_sample": True, "top_k": 0}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens"),
    ({"exponential_decay_length_penalty": [-1, 1.0]}, "exponential_decay_length_penalty"),
    ({"exponential_decay_length_penalty": [1, 0.5]}, "exponential_decay_length_penalty"),
])
def test_out_of_range_values_are_400_naming_the_field(parameters, field):
    err = error_of(lightllm, parameters)
    assert err.status == 400 and err.message.startswith(f"{field}:") and err.param == field


def test_validation_runs_in_lightllm_order():
    # best_of is checked before the penalties, which are checked before max_new_tokens.
    err = error_of(lightllm, {"max_new_tokens": 0, "presence_penalty": -1, "best_of": 0})
    assert err.param == "best_of"


@pytest.mark.parametrize("parameters, fragment", [
    ({"max_new_tokens": "16"}, "max_new_tokens: expected an integer, got string"),
    ({"max_new_tokens": 16.0}, "max_new_tokens: expected an integer, got number"),
    ({"do_sample": 1}, "do_sample: expected true or false, got number"),
    ({"temperature": True}, "temperature: expected a number, got boolean"),
    ({"temperature": None}, "temperature: expected a number, got null"),
    ({"stop_sequences": ["a", 3]}, "stop_sequences: expected a string or a list of strings"),
    ({"exponential_decay_length_penalty": [1.5, 1.0]}, "exponential_decay_length_penalty[0]: expected an integer"),
    ({"exponential_decay_length_penalty": 2}, "expected a pair"),
    ({"seed": 1}, "parameters: unknown field 'seed'"),
    ({"temprature": 0.5}, "parameters: unknown field 'temprature'"),
])
def test_wrong_types_and_unknown_fields_are_422(parameters, fragment):
    err = error_of(lightllm, parameters)
    assert err.status == 422 and fragment in err.message


def test_stop_sequences_take_a_string_or_a_list():
    assert lightllm({"stop_sequences": "\n"}).stop_sequences == ("\n",)
    assert lightllm({"stop_sequences": ["a", "bc"]}).stop_sequences == ("a", "bc")
    assert lightllm({"stop_sequences": None}).stop_sequences == ()
    assert error_of(lightllm, {"stop_sequences": [""]}).status == 400


def test_decay_pair_accepts_an_integer_factor():
    assert lightllm({"exponential_decay_length_penalty": [3, 2]}).exponential_decay_length_penalty == (3, 2.0)


def test_group_members_get_consecutive_seeds():
    params = lightllm({"best_of": 3, "do_sample": True, "top_k": 5})
    assert [member_params(params, i).seed for i in range(3)] == [None] * 3
    seeded = sampling_params({"best_of": 2, "do_sample": True, "seed": 2**64 - 1})
    assert [member_params(seeded, i).seed for i in range(2)] == [2**64 - 1, 0]


def test_error_bodies_per_format():
    err = ApiError(400, "top_p: must be in (0, 1]", param="top_p")
    assert lightllm_error_body(err) == {"message": "top_p: must be in (0, 1]"}
    assert "error" not in lightllm_error_body(err)
    assert tgi_error_body(err) == {"message": err.message, "error": err.message, "error_type": "validation"}
    body = openai_error_body(err)["error"]
    assert body["message"] == err.message and body["param"] == "top_p" and body["type"] == "invalid_request_error"


def test_sse_framing():
    assert event({"a": "é", "n": None}) == 'data:{"a":"é","n":null}\n\n'.encode()  # UTF-8, not \u escapes
    assert event({"a": 1}, space=True) == b'data: {"a":1}\n\n'
    assert event({3: [0.5, True]}) == b'data:{"3":[0.5,true]}\n\n'  # keys as the json module writes them


def test_logprobs_stay_finite():
    assert finite_logprob(float("-inf")) == LOGPROB_FLOOR
    assert finite_logprob(-0.5) == -0.5
    json.dumps(finite_logprob(float("nan")), allow_nan=False)
