"""--token_healing_mode against the real server: greedy continuations of prompts ending mid-word, inside a URL,
after an operator and mid-identifier in code equal transformers' float32 logits with the same constraint
applied by a plain reference; the answer starts where the caller's prompt ended and counts the caller's
prompt, on /generate, /generate_stream and /v1/completions."""

import numpy as np
import openai
import pytest
from e2e_server import running_server

from jaxllm.engine.token_healing import MAX_BACKUP

PROMPTS = ["The capital of Fra", "Visit our website at https:", "if (a >", "def compute_aver"]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def healing_server(smollm2_dir, tmp_path_factory):
    yield from running_server(smollm2_dir, ["--token_healing_mode", "--tokenizer_mode", "fast"],
                              tmp_path_factory.mktemp("healing") / "server.log")


def token_text(tokenizer, t):
    return tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def reference_healing(model, tokenizer, prompt_ids):
    """The rule, plainly: back up over the last tokens (up to 2, keeping one), then greedy decoding where each
    token must extend or cover what is left of the removed text, scanning the whole vocabulary each step;
    NEW_TOKENS tokens beyond the caller's prompt. Returns every generated token."""
    import torch

    k = min(MAX_BACKUP, len(prompt_ids) - 1)
    remaining = "".join(token_text(tokenizer, t) for t in prompt_ids[-k:])
    seq, generated, beyond = list(prompt_ids[:-k]), [], 0
    special = set(tokenizer.all_special_ids)
    texts = [token_text(tokenizer, t) for t in range(len(tokenizer))]
    while beyond < NEW_TOKENS:
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1].numpy()
        if remaining:
            ok = np.array([t not in special and bool(s) and "\ufffd" not in s
                           and (s.startswith(remaining) or remaining.startswith(s)) for t, s in enumerate(texts)])
            logits = np.where(ok, logits[: len(ok)], -np.inf)
        token = int(np.argmax(logits))
        text = texts[token]
        beyond += len(text) > len(remaining)
        remaining = remaining[len(text):] if remaining.startswith(text) else ""
        seq.append(token)
        generated.append(token)
    return generated


@pytest.fixture(scope="module")
def expected(smollm2_transformers, tokenizer):
    """prompt → (caller's token count, the answer text beyond the caller's prompt), from transformers."""
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        generated = reference_healing(smollm2_transformers, tokenizer, ids)
        healed = tokenizer.decode(ids[:-min(MAX_BACKUP, len(ids) - 1)] + generated)
        assert healed.startswith(prompt)
        out[prompt] = (len(ids), healed[len(prompt):])
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_healed_answers_match_the_reference_on_generate_and_its_stream(healing_server, expected, prompt):
    prompt_tokens, text = expected[prompt]
    params = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    status, out = healing_server.post("/generate", {"inputs": prompt, "parameters": params})
    assert status == 200 and out["generated_text"][0] == text
    assert out["prompt_tokens"] == prompt_tokens and out["count_output_tokens"] == NEW_TOKENS
    status, events = healing_server.stream("/generate_stream", {"inputs": prompt, "parameters": params})
    assert status == 200 and "".join(e["token"]["text"] for e in events) == text
    assert events[-1]["finish_reason"] == "length"


def test_healed_answers_on_openai_completions(healing_server, expected):
    client = openai.OpenAI(base_url=healing_server.base + "/v1", api_key="unused", max_retries=0, timeout=600)
    prompt = PROMPTS[1]
    prompt_tokens, text = expected[prompt]
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=NEW_TOKENS, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == text
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens == NEW_TOKENS
    pieces = [c.choices[0].text for c in client.completions.create(
        model="m", prompt=prompt, max_tokens=NEW_TOKENS, stream=True, extra_body={"ignore_eos": True}) if c.choices]
    assert "".join(pieces) == text
