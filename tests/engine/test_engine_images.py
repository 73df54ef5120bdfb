"""Images through the engine (tiny random LLaVA, --enable_multimodal, splitfuse chunks that cut images):
greedy tokens equal transformers' `generate` with the images; each distinct image is encoded once; the prompt cache never matches across
different images; requests whose images find no cache room wait and all finish; after random traffic with
aborts no KV slot and no image reference is left."""

import hashlib
import random

import numpy as np
import pytest
import torch

from jaxllm.engine.request import SamplingParams
from tests.engine.engine_helpers import make_engine
from tests.models.llava_helpers import IMAGE_TOKEN, photo, save_tiny_llava

PHOTOS = ("chelsea", "coffee", "astronaut", "camera")
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-engine")
    return path, save_tiny_llava(path)


def image_inputs(engine, names):
    out = []
    for name in names:
        digest = hashlib.sha256(photo(name).tobytes()).hexdigest()
        out.append(engine.image_processor(photo(name), digest))
    return out


def prompt_with(n_images: int, seed: int, length: int = 10) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in rng.integers(3, 400, size=length)]
    for k in range(n_images):
        ids[1 + 3 * k] = IMAGE_TOKEN
    return ids


def hf_greedy(hf_model, engine, prompt, images, new_tokens=8) -> list[int]:
    from jaxllm.models.vision.interface import expand_placeholders

    expanded = expand_placeholders(prompt, IMAGE_TOKEN, images)
    pixels = torch.tensor(np.stack([im.pixels for im in images]))
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor([expanded]), pixel_values=pixels, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(expanded):].tolist()


def run(engine, requests):
    streams = [engine.submit_images(prompt, GREEDY, images) for prompt, images in requests]
    return [[e.token_id for e in s] for s in streams]


@pytest.fixture(scope="module")
def engine(llava):
    """Splitfuse chunks of 8 tokens cut each 9-token image between steps (and mix it with decodes)."""
    path, _ = llava
    with make_engine(path, load_format="auto", enable_multimodal=True, cache_capacity=3, cache_reserved_ratio=0.34,
                     use_dynamic_prompt_cache=True, splitfuse_mode=True, splitfuse_block_size=8) as engine:
        yield engine


def test_greedy_tokens_match_transformers(llava, engine):
    _, hf_model = llava
    cases = [(prompt_with(1, 0), image_inputs(engine, ["chelsea"])),
             (prompt_with(2, 1), image_inputs(engine, ["coffee", "astronaut"]))]
    got = run(engine, cases)
    for (prompt, images), tokens in zip(cases, got):
        assert tokens == hf_greedy(hf_model, engine, prompt, images)


def test_images_encoded_once_and_cache_keys(llava, engine):
    """The same text with another image finds only the text before the image cached; the same image again is
    no new encode and finds its whole prompt cached."""
    _, hf_model = llava
    assert engine.wait_idle(60)
    before = engine.stats()["images_encoded"]
    prompt = prompt_with(1, 7, length=12)
    (first,) = image_inputs(engine, ["camera"])
    (other,) = image_inputs(engine, ["chelsea"])
    events = []
    for image in (first, other, first):
        stream = engine.submit_images(prompt, GREEDY, [image])
        events.append(list(stream))
    cached = [ev[0].cached_tokens for ev in events]
    assert cached[1] == 1  # the token before the image, nothing past it
    assert cached[2] >= len(prompt) - 1 + first.num_tokens - 1  # the whole prompt (its last token recomputed)
    assert [e.token_id for e in events[1]] == hf_greedy(hf_model, engine, prompt, [other])
    assert [e.token_id for e in events[0]] == [e.token_id for e in events[2]]
    stats = engine.stats()
    encoded_now = stats["images_encoded"] - before
    assert encoded_now <= 2  # camera once (chelsea may still be cached from the first test)


def test_waits_for_room_and_leaks_nothing(engine):
    """Capacity 3: requests of 2 distinct images each, more than fit at once, all finish (some wait); random
    aborts on the way; then no KV slot held by a request and no image referenced."""
    rng = random.Random(0)
    inputs = [image_inputs(engine, rng.sample(PHOTOS, 2)) for _ in range(10)]  # all preprocessed first
    streams = []
    for i, images in enumerate(inputs):
        stream = engine.submit_images(prompt_with(2, 100 + i), GREEDY, images)
        streams.append(stream)
        if i % 4 == 3:
            engine.abort(stream.request_id)
    finished = [list(s)[-1].finish_reason for s in streams]
    assert finished.count("abort") <= 3 and finished.count("length") >= 7
    assert engine.wait_idle(60)
    stats = engine.stats()
    assert stats["image_cache_referenced"] == 0 and stats["images_waiting"] == 0
    assert stats["image_cache_entries"] <= 3 and stats["image_cache_evictions"] > 0 and stats["image_room_waits"] > 0
    assert stats["kv_used"] == 0 and engine.kv.num_free + engine.kv.num_cached == engine.kv.num_slots
    engine.kv.check([])


def test_group_shares_its_images(llava, engine):
    """best_of 2 greedy members of one prompt with an image: both give transformers' tokens; one reference each,
    released at the end."""
    _, hf_model = llava
    prompt, images = prompt_with(1, 11), image_inputs(engine, ["coffee"])
    streams = engine.submit_group(prompt, SamplingParams(best_of=2, n=2, max_new_tokens=8, ignore_eos=True),
                                  images=images)
    expected = hf_greedy(hf_model, engine, prompt, images)
    assert [[e.token_id for e in s] for s in streams] == [expected, expected]
    assert engine.wait_idle(60) and engine.stats()["image_cache_referenced"] == 0


def test_tp2_greedy_tokens_match_transformers(llava, engine):
    """--tp 2 on fake CPU devices: the tower's heads and MLP split like the language model's."""
    path, hf_model = llava
    prompt, images = prompt_with(1, 12), image_inputs(engine, ["astronaut"])
    with make_engine(path, load_format="auto", enable_multimodal=True, tp=2) as tp2:
        (tokens,) = run(tp2, [(prompt, images)])
    assert tokens == hf_greedy(hf_model, engine, prompt, images)


def test_llava_without_the_flag_refuses_images(llava, engine):
    path, _ = llava
    plain = make_engine(path, load_format="auto")  # not started: submit checks before queueing
    assert plain.image_processor is None
    with pytest.raises(ValueError, match="--enable_multimodal"):
        plain.submit_images(prompt_with(1, 0), GREEDY, image_inputs(engine, ["chelsea"]))


def test_bad_requests(engine):
    images = image_inputs(engine, ["chelsea"])
    with pytest.raises(ValueError, match="2 image placeholders for 1 images"):
        engine.submit_images(prompt_with(2, 3), GREEDY, images)
    with pytest.raises(ValueError, match="cache_capacity"):
        engine.submit_images(prompt_with(4, 3, length=14), GREEDY, image_inputs(engine, PHOTOS))


def test_vision_benchmark_runs(engine):
    """`python -m jaxllm.bench.vision`'s measurements on the tiny model (the GPU entry point's logic)."""
    from jaxllm.bench.vision import run as bench

    result = bench(engine, concurrent=2, text_len=12, output_len=2)
    assert result["repeated_image_encodes"] == 0 and result["image_tokens"] == 9
    assert result["concurrent_output_tokens_per_s"] > 0 and result["encode_ms_16_images"] > 0


def test_image_buffer_holds_capacity_images_but_never_more_rows_than_the_kv_cache(llava, engine):
    from jaxllm.engine.loading import image_buffer
    from jaxllm.offline import server_args

    path, _ = llava
    per_image = engine.image_processor.max_tokens
    for capacity, kv_tokens, expected in ((3, 4096, 3 * per_image), (10_000, 4096, 4096)):
        args = server_args(str(path), enable_multimodal=True, cache_capacity=capacity, max_total_token_num=kv_tokens)
        _, rows = image_buffer(args, engine.config)
        assert rows == expected
