"""The TGI format (--use_tgi_api, with --return_all_prompt_logprobs and --long_truncation_mode head) against the
real server, through Hugging Face's own `text_generation` client and raw HTTP."""

import pytest
from e2e_server import chat_text
from text_generation import Client
from text_generation.errors import ValidationError

POEM = "Write a short poem about the moon."

# The client still calls pydantic's deprecated .dict().
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def client(tgi_server):
    return Client(tgi_server.base, timeout=120)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return chat_text(tokenizer, POEM)


def test_client_generate(client, prompt, tgi_server):
    reply = client.generate(prompt, max_new_tokens=8, decoder_input_details=True)
    details = reply.details
    assert details.finish_reason.value == "length" and details.generated_tokens == 8 and details.seed is None
    assert "".join(t.text for t in details.tokens) == reply.generated_text and len(details.tokens) == 8
    # prefill: every prompt token with its logprob given the prefix (none for the first)
    prefill = details.prefill
    assert prefill[0].logprob is None and all(t.logprob is not None and t.logprob <= 0 for t in prefill[1:])
    status, raw = tgi_server.post("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 8}})
    item, = raw
    assert status == 200 and item["generated_text"] == reply.generated_text
    # --return_all_prompt_logprobs: LightLLM's prompt fields, agreeing with TGI's prefill
    assert item["prompt_token_ids"] == [t.id for t in prefill]
    assert [next(iter(lp.values())) for _, lp in item["prompt_logprobs"]] == pytest.approx(
        [t.logprob for t in prefill[1:]], rel=1e-5)


def test_client_stream(client, prompt):
    full = client.generate(prompt, max_new_tokens=8)
    events = list(client.generate_stream(prompt, max_new_tokens=8))
    assert len(events) == 8 and "".join(e.token.text for e in events) == full.generated_text
    assert [e.generated_text for e in events[:-1]] == [None] * 7 and events[-1].generated_text == full.generated_text
    assert events[-1].details.finish_reason.value == "length" and events[-1].details.generated_tokens == 8


def test_top_n_tokens_list_each_positions_most_likely_tokens(client, prompt, tokenizer):
    reply = client.generate(prompt, max_new_tokens=6, top_n_tokens=3)
    tokens, tops = reply.details.tokens, reply.details.top_tokens
    assert len(tops) == len(tokens) == 6
    for chosen, top in zip(tokens, tops):
        assert len(top) == 3 and [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].id == chosen.id and top[0].logprob == pytest.approx(chosen.logprob, abs=1e-4)  # greedy
        assert len({t.id for t in top}) == 3 and all(t.text == tokenizer.decode([t.id]) for t in top)
    events = list(client.generate_stream(prompt, max_new_tokens=6, top_n_tokens=3))
    assert [[t.id for t in e.top_tokens] for e in events] == [[t.id for t in top] for top in tops]
    assert client.generate(prompt, max_new_tokens=2).details.top_tokens is None  # none asked, none sent
    with pytest.raises(ValidationError, match="top_n_tokens"):
        client.generate(prompt, max_new_tokens=2, top_n_tokens=6)


def test_typical_p_draws_as_transformers_does(client, prompt, tokenizer, smollm2_transformers):
    """typical_p so small that one token holds the mass: the token whose surprisal is nearest the entropy, each
    step, whatever the seed: transformers' TypicalLogitsWarper gives the same tokens."""
    import torch

    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = smollm2_transformers.generate(ids, do_sample=True, typical_p=1e-6, top_k=0, top_p=1.0,
                                            temperature=1.0, max_new_tokens=8, min_new_tokens=8)
    expected = out[0, ids.shape[1]:].tolist()
    for seed in (1, 2):
        reply = client.generate(prompt, max_new_tokens=8, do_sample=True, typical_p=1e-6, seed=seed)
        assert [t.id for t in reply.details.tokens] == expected
    plain = client.generate(prompt, max_new_tokens=8).details.tokens
    assert [t.id for t in plain] != expected  # not the greedy answer


def test_client_sampling_seed_stop_and_full_text(client, prompt):
    a = client.generate(prompt, max_new_tokens=6, do_sample=True, temperature=1.3, seed=42)
    b = client.generate(prompt, max_new_tokens=6, do_sample=True, temperature=1.3, seed=42)
    assert a.generated_text == b.generated_text and a.details.seed == 42
    greedy = client.generate(prompt, max_new_tokens=8).generated_text
    stop = greedy[3:6]
    stopped = client.generate(prompt, max_new_tokens=8, stop_sequences=[stop])
    assert stopped.details.finish_reason.value == "stop_sequence" and stopped.generated_text.endswith(stop)
    full = client.generate(prompt, max_new_tokens=4, return_full_text=True)
    assert full.generated_text.startswith(prompt)


def test_truncate_and_head_truncation(client, tgi_server, tokenizer):
    words = "one two three four five six seven eight nine ten " * 20  # far over --max_req_input_len 96
    reply = client.generate(words, max_new_tokens=2, truncate=5, decoder_input_details=True)
    assert [t.id for t in reply.details.prefill] == tokenizer.encode(words)[-5:]
    status, out = tgi_server.post("/generate", {"inputs": words, "parameters": {"max_new_tokens": 2}})
    assert status == 200 and out[0]["prompt_token_ids"] == tokenizer.encode(words)[-96:]


def test_best_of(tgi_server, prompt):
    status, out = tgi_server.post("/generate", {"inputs": prompt, "parameters": {
        "best_of": 2, "do_sample": True, "seed": 5, "details": True, "max_new_tokens": 4}})
    assert status == 200 and len(out) == 2
    assert [o["details"]["seed"] for o in out] in ([5, 6], [6, 5])
    assert out[0]["details"]["best_of_sequences"][0]["seed"] == out[1]["details"]["seed"]
    assert sum(t["logprob"] for t in out[0]["details"]["tokens"]) >= sum(t["logprob"] for t in out[1]["details"]["tokens"])


def test_errors_reach_the_client(client, tgi_server):
    with pytest.raises(ValidationError, match="watermark"):
        client.generate("Hi", watermark=True)
    with pytest.raises(ValidationError, match="repetition_penalty"):  # the client allows 0.5; LightLLM needs >= 1
        client.generate("Hi", repetition_penalty=0.5)
    with pytest.raises(ValidationError, match="--max_req_total_len"):
        client.generate("Hi", max_new_tokens=500)
    status, out = tgi_server.post("/generate", {"inputs": "Hi", "parameters": {"colour": "red"}})
    assert status == 422 and out["error_type"] == "validation" and "colour" in out["message"]
