"""The offline API (`from jaxllm import LLM, SamplingParams`) on the converted SmolLM2-135M-Instruct, float32:
text and token prompts, stops, logprobs; and on a 2-layer Llama with random weights and SmolLM2's tokenizer (the
same code paths, a fraction of the compile time; near-uniform logits make greedy ties break on any numeric
difference): batch invariance, and the same greedy tokens with --splitfuse_mode or --use_dynamic_prompt_cache
as without."""

import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.offline import server_args

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.", "Hi!",
    "Explain gravity in one sentence.", "What is 2 + 2?", "Name a color.", "Translate 'cat' to French.",
]


FLAGS = {"data_type": "float32", "max_total_token_num": 4096, "max_req_input_len": 128, "max_req_total_len": 192,
         "running_max_req_size": 64, "batch_max_tokens": 1024, "warmup": 0, "disable_log_stats": True}
# A system message that half of the mixed prompts share (≈ 45 tokens with the chat template).
SYSTEM = ("You are a concise assistant for a geography and science quiz. Answer in one short sentence, "
          "without lists, and never repeat the question back to the user.")


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    with LLM(str(smollm2_dir), **FLAGS) as model:
        yield model


@pytest.fixture(scope="module")
def tiny_llm(tiny_served_model):
    with LLM(str(tiny_served_model.path), load_format="dummy", **FLAGS) as model:
        yield model


def chat_prompts(llm, count):
    texts = [f"{QUESTIONS[i % len(QUESTIONS)]}" + " Please answer briefly." * (i // len(QUESTIONS))
             for i in range(count)]
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True) for t in texts]


def mixed_prompts(llm, count):
    """Chat prompts of 38–62 tokens: even ones open with the shared system message, odd ones with the
    template's default one and a question padded to various lengths."""
    prompts = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i % 2:
            messages = [{"role": "user", "content": question + " Please answer briefly." * (i % 7)}]
        else:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        prompts.append(llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompts


def test_flags_are_the_servers_by_keyword(tmp_path):
    args = server_args(str(tmp_path), data_type="float32", max_total_token_num=9000, eos_id=[2, 5])
    assert (args.data_type, args.max_total_token_num, args.eos_id) == ("float32", 9000, [2, 5])
    assert args.batch_max_tokens == 3072  # resolved like the CLI's default
    with pytest.raises(TypeError, match="no_such_flag"):
        server_args(str(tmp_path), no_such_flag=1)
    with pytest.raises(ValueError, match="data_type"):
        server_args(str(tmp_path), data_type="float8")
    assert server_args(str(tmp_path), splitfuse_mode=True, use_dynamic_prompt_cache=True).splitfuse_mode


def test_generate_text_and_token_prompts(llm):
    prompts = chat_prompts(llm, 4)
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=16), use_tqdm=False)
    assert len(outputs) == 4
    for prompt, out in zip(prompts, outputs):
        assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
        assert out.finish_reason in ("stop", "length") and 1 <= len(out.token_ids) <= 16
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp in out.logprobs)
    assert "Paris" in outputs[0].text
    # The same prompts as token ids give the same tokens (greedy).
    again = llm.generate([o.prompt_token_ids for o in outputs], SamplingParams(max_new_tokens=16), use_tqdm=False)
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs]


def test_stop_sequences_end_the_text_and_stay_in_it(llm):
    prompt = chat_prompts(llm, 1)
    free = llm.generate(prompt, SamplingParams(max_new_tokens=24), use_tqdm=False)[0]
    stop = free.text.split()[2]  # a word from the middle of the free answer
    out = llm.generate(prompt, SamplingParams(max_new_tokens=24, stop_sequences=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text.endswith(stop) and out.text == free.text[: free.text.index(stop) + len(stop)]


def test_prompt_logprobs(llm):
    prompt = chat_prompts(llm, 1)[0]
    out = llm.generate([prompt], SamplingParams(max_new_tokens=1, prompt_logprobs=True), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert [entry[0] for entry in out.prompt_logprobs] == ids[:-1]
    assert [list(entry[1]) for entry in out.prompt_logprobs] == [[str(t)] for t in ids[1:]]
    assert all(lp <= 0 for entry in out.prompt_logprobs for lp in entry[1].values())


def test_batch_invariance_48_mixed_requests(tiny_llm):
    """48 greedy requests of mixed lengths, submitted together (two prefill batches, then mixed decodes), give
    exactly the tokens each gives alone; 16 of them are run alone, among them every question, every prompt
    length and every output length."""
    prompts = chat_prompts(tiny_llm, 48)
    params = [SamplingParams(max_new_tokens=2 + i % 3, ignore_eos=True) for i in range(48)]
    together = tiny_llm.generate(prompts, params, use_tqdm=False)
    picked = [3 * k + k % 3 for k in range(16)]
    alone = [tiny_llm.generate([prompts[i]], [params[i]], use_tqdm=False)[0] for i in picked]
    assert [together[i].token_ids for i in picked] == [o.token_ids for o in alone]


def test_n_above_one_is_refused(llm):
    with pytest.raises(ValueError, match="best_of"):
        llm.generate(["hi"], SamplingParams(best_of=2, n=2, do_sample=True), use_tqdm=False)


@pytest.fixture(scope="module")
def mixed_default(tiny_llm):
    """32 mixed prompts and their greedy tokens in the default mode."""
    prompts = mixed_prompts(tiny_llm, 32)
    return prompts, [o.token_ids for o in tiny_llm.generate(prompts, MIXED_PARAMS, use_tqdm=False)]


MIXED_PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("flags", [{"splitfuse_mode": True, "splitfuse_block_size": 48},
                                   {"use_dynamic_prompt_cache": True}], ids=["splitfuse", "prompt-cache"])
def test_32_mixed_requests_give_the_same_tokens_with_the_flag(mixed_default, tiny_served_model, flags):
    prompts, expected = mixed_default
    with LLM(str(tiny_served_model.path), load_format="dummy", **FLAGS, **flags) as other:
        got = other.generate(prompts, MIXED_PARAMS, use_tqdm=False)
        stats = other.engine.stats()
    assert [o.token_ids for o in got] == expected
    lengths = [len(o.prompt_token_ids) for o in got]
    if "use_dynamic_prompt_cache" in flags:  # later prefill batches reuse what the first one cached
        assert stats["prompt_cache_hit_tokens"] > 500
        assert stats["prefill_tokens"] == sum(lengths) - stats["prompt_cache_hit_tokens"]
    else:  # prompts longer than a block were prefilled over several steps
        assert sum(n > 48 for n in lengths) >= 12 and stats["prefill_steps"] >= sum(lengths) // 48


def test_print_eos_token_prints_the_eos_text_even_when_specials_are_skipped(llm):
    prompt = chat_prompts(llm, 6)[5]  # "What is 2 + 2?"
    quiet, loud = (llm.generate([prompt], SamplingParams(max_new_tokens=48, print_eos_token=flag), use_tqdm=False)[0]
                   for flag in (False, True))
    assert quiet.finish_reason == loud.finish_reason == "stop" and quiet.token_ids == loud.token_ids
    assert loud.token_ids[-1] == llm.tokenizer.eos_token_id
    assert loud.text == quiet.text + llm.tokenizer.eos_token and "<|im_end|>" not in quiet.text
