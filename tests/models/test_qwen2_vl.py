"""Qwen2-VL against transformers (PyTorch, float32, CPU) on a tiny random config and real photographs
(tests/assets/images): the image processor (transformers' PIL backend), the M-RoPE positions of a prompt with
images (`get_rope_index`), the whole model's logits on a prompt with two images of different sizes (encoded as
one padded batch) at tp 1 and tp 2, and greedy tokens through the engine against `generate`."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from jaxllm.config import ModelConfig
from jaxllm.models.vision import mrope
from jaxllm.models.vision.interface import expand_placeholders
from jaxllm.models.vision import qwen2_vl as vision
from jaxllm.models.vision.qwen2_vl_processor import Qwen2VLImageProcessor
from tests.models.hf_oracle import random_hf_model

IMAGES = Path(__file__).resolve().parents[1] / "assets" / "images"
IMAGE, START, END = 250, 251, 252  # <|image_pad|>, <|vision_start|>, <|vision_end|> in the tiny vocabulary
RAW = dict(
    model_type="qwen2_vl", image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END,
    video_token_id=253, tie_word_embeddings=False,
    text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
    vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2),
)
WIDTH = 128  # KV slots of the tests' single request
# A pixel budget that keeps the photographs at a handful of tokens each.
PROCESSOR = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 24)


def photo(name: str) -> Image.Image:
    return Image.open(IMAGES / f"{name}.png")


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "camera"])
def test_processor_equals_transformers(name):
    """Resize, rescale, normalise and patch order equal transformers' (the grayscale photograph too)."""
    ours = Qwen2VLImageProcessor(**PROCESSOR)(photo(name), digest="d")
    theirs = Qwen2VLImageProcessorPil(**PROCESSOR)(images=[photo(name)], return_tensors="np")
    assert ours.grid == tuple(theirs["image_grid_thw"][0])
    np.testing.assert_array_equal(ours.pixels, theirs["pixel_values"])
    assert ours.num_tokens == int(np.prod(ours.grid)) // 4 == Qwen2VLImageProcessor(**PROCESSOR).num_tokens(
        photo(name).height, photo(name).width)


def test_processor_reads_both_preprocessor_config_layouts():
    old = Qwen2VLImageProcessor.from_dict({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14})
    new = Qwen2VLImageProcessor.from_dict({"size": {"shortest_edge": 3136, "longest_edge": 12845056}})
    assert old == new and old.max_pixels == 12845056
    assert Qwen2VLImageProcessor().resized_size(10, 50) == (28, 140)  # below the budget: scaled up
    with pytest.raises(ValueError, match="aspect ratio"):
        Qwen2VLImageProcessor().resized_size(10, 2500)


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(RAW, transformers.AutoModelForImageTextToText)


def prompt_with_images(images, seed: int = 0) -> list[int]:
    """Random text with each image's expanded placeholder (start, image tokens, end) in between."""
    rng = np.random.default_rng(seed)
    text = lambda n: [int(t) for t in rng.integers(0, IMAGE, size=n)]  # noqa: E731
    ids = text(5)
    for image in images:
        ids += [START] + [IMAGE] * image.num_tokens + [END] + text(4)
    return ids


def test_rope_positions_equal_get_rope_index(hf_model):
    """The prompt's positions in one span and in chunks; later tokens at index + offset (`rope_deltas`)."""
    images = [Qwen2VLImageProcessor(**PROCESSOR)(photo(n)) for n in ("chelsea", "coffee")]
    ids = prompt_with_images(images)
    types = torch.tensor([[1 if t == IMAGE else 0 for t in ids]])
    expected, delta = hf_model.model.get_rope_index(torch.tensor([ids]), types,
                                                    image_grid_thw=torch.tensor([i.grid for i in images]))
    places = mrope.prompt_images(ids, IMAGE, [i.grid for i in images], merge_size=2)
    n = len(ids)
    np.testing.assert_array_equal(mrope.positions(places, 2, 0, n), expected[:, 0].numpy())
    chunks = [mrope.positions(places, 2, a, b) for a, b in ((0, 9), (9, 10), (10, 31), (31, n + 3))]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1)[:, :n], expected[:, 0].numpy())
    assert mrope.offset(places, 2) == int(delta) < 0
    np.testing.assert_array_equal(chunks[-1][:, -3:], np.tile(np.arange(n, n + 3) + int(delta), (3, 1)))
    with pytest.raises(ValueError, match="more image tokens"):
        mrope.prompt_images(ids, IMAGE, [images[0].grid], merge_size=2)


def test_real_config_counts_qwen2_vl_7b_parameters():
    import json

    raw = json.loads((Path(__file__).resolve().parents[1] / "assets" / "configs" / "qwen2-vl-7b.json").read_text())
    config = ModelConfig.from_hf_dict(raw)
    assert config.rope.mrope_section == (16, 24, 24) and config.qkv_bias and config.layer_windows == ()
    assert config.num_params + config.vision.num_params == 8_291_375_616  # Qwen2-VL-7B-Instruct


# --- the whole model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    """The random model saved as a checkpoint, with a preprocessor_config.json of the tests' pixel budget."""
    import json

    path = tmp_path_factory.mktemp("qwen2_vl")
    hf_model.save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {**PROCESSOR, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}))
    return path


@pytest.fixture(scope="module")
def request_with_images(hf_model):
    """Two photographs of different sizes in one prompt, and transformers' logits for it."""
    images = [Qwen2VLImageProcessor(**PROCESSOR)(photo(n)) for n in ("chelsea", "astronaut")]
    ids = prompt_with_images(images, seed=1)
    with torch.no_grad():
        logits = hf_model(**hf_inputs(ids, images)).logits[0].numpy()
    return ids, images, logits


def hf_inputs(ids, images) -> dict:
    """transformers' inputs (the attention mask given: `generate` would take token 0 for padding)."""
    inputs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    if images:
        inputs.update(mm_token_type_ids=torch.tensor([[int(t == IMAGE) for t in ids]]),
                      pixel_values=torch.tensor(np.concatenate([i.pixels for i in images])),
                      image_grid_thw=torch.tensor([i.grid for i in images]))
    return inputs


def load(path, tp: int):
    from jaxllm.models import build_model
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import load_hf

    config = ModelConfig.from_model_dir(path)
    model = build_model(config, jnp.float32)
    return config, model, load_hf(model, path, make_mesh(tp), tp)


def image_embeddings(config, params, images) -> np.ndarray:
    """The images' embeddings [Σ tokens, hidden] in prompt order, from the family's padded encoder batches."""
    tower = vision.Qwen2VLVisionTower(config.vision, jnp.float32)
    out = [None] * len(images)
    for batch in vision.encode_batches(images, config.vision.merge_size, max_batch=4):
        embeds = np.asarray(jax.jit(tower.apply)({"params": params["vision"]}, *batch.inputs))
        assert batch.inputs[0].shape[0] == 2 and len(batch.images) == 2  # one batch of both sizes, rows padded
        for row, i in enumerate(batch.images):
            out[i] = embeds[row, batch.token_index[row] >= 0]
    return np.concatenate(out)


def prefill(config, model, params, ids, images, cache, width: int):
    """The prompt through the model: image tokens take the images' embeddings, M-RoPE positions."""
    from jaxllm.models.attention import AttentionMetadata

    embeds = np.zeros((len(ids), config.hidden_size), np.float32)
    mask = np.asarray(ids) == IMAGE
    embeds[mask] = image_embeddings(config, params, images)
    meta = AttentionMetadata.for_sequences([(0, len(ids))], [list(range(width))], scratch_slot=width, width=width)
    places = mrope.prompt_images(ids, IMAGE, [i.grid for i in images], config.vision.merge_size)
    meta = meta.replace(rope_positions=jnp.asarray(mrope.positions(places, config.vision.merge_size, 0, len(ids))))
    step = jax.jit(lambda p, t, m, c, e, k: model.apply({"params": p}, t, m, c, all_logits=True, image_embeds=e,
                                                        image_mask=k))
    return step(params, jnp.asarray(ids, jnp.int32), meta, cache, jnp.asarray(embeds), jnp.asarray(mask))


@pytest.fixture(scope="module")
def prefilled(checkpoint, request_with_images):
    """The model at tp 1 and its logits on the prompt with images: (config, model, params, logits)."""
    from jaxllm.models import init_kv_cache

    ids, images, _ = request_with_images
    config, model, params = load(checkpoint, 1)
    logits, _ = prefill(config, model, params, ids, images, init_kv_cache(model, WIDTH), WIDTH)
    return config, model, params, logits


def test_logits_with_images_match_transformers(prefilled, request_with_images, hf_model):
    config, _, params, logits = prefilled
    np.testing.assert_allclose(np.asarray(logits), request_with_images[2], atol=1e-4, rtol=0)
    count = sum(p.size for p in jax.tree.leaves(params))  # the parameter counts the benchmarks use
    assert count == config.num_params + config.vision.num_params == sum(p.numel() for p in hf_model.parameters())


def test_logits_with_images_match_transformers_at_tp2(checkpoint, request_with_images):
    """The vision tower's heads and MLP split over 2 devices like the language model's."""
    from jaxllm.models import init_kv_cache

    ids, images, expected = request_with_images
    config, model, params = load(checkpoint, 2)
    assert params["vision"]["blocks_0"]["attn"]["qkv_proj"].sharding.spec[2] == "tp"
    logits, _ = prefill(config, model, params, ids, images, init_kv_cache(model, WIDTH), WIDTH)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_images_without_mrope_positions_are_refused(prefilled, request_with_images):
    """A step that brings image embeddings but 1D positions would run silently wrong: it is an error."""
    from jaxllm.models import init_kv_cache
    from jaxllm.models.attention import AttentionMetadata

    config, model, params, _ = prefilled
    ids = request_with_images[0]
    meta = AttentionMetadata.for_sequences([(0, len(ids))], [list(range(WIDTH))], scratch_slot=WIDTH, width=WIDTH)
    embeds = jnp.ones((len(ids), config.hidden_size), jnp.float32)
    with pytest.raises(ValueError, match="M-RoPE positions"):
        model.apply({"params": params}, jnp.asarray(ids, jnp.int32), meta, init_kv_cache(model, WIDTH),
                    image_embeds=embeds, image_mask=jnp.asarray(np.asarray(ids) == IMAGE))


def test_engine_greedy_tokens_match_transformers_generate(checkpoint, hf_model):
    """Through the engine (--enable_multimodal, splitfuse chunks of 8 that cut the images, so M-RoPE positions
    start mid-image): a request with two photographs, one with one beside it and a text-only one, each 10
    greedy tokens equal to transformers' `generate`; the first again hits the prompt cache (M-RoPE positions
    follow the index) and gives the same tokens."""
    import hashlib

    from jaxllm.engine.request import SamplingParams
    from tests.engine.engine_helpers import make_engine

    greedy = SamplingParams(max_new_tokens=10, ignore_eos=True)
    rng = np.random.default_rng(5)
    text = lambda n: [int(t) for t in rng.integers(0, IMAGE, size=n)]  # noqa: E731
    placeholder = [START, IMAGE, END]
    cases = [(text(3) + placeholder + text(2) + placeholder + text(3), ("chelsea", "camera")),
             (text(6) + placeholder + text(4), ("coffee",)), (text(9), ())]
    with make_engine(checkpoint, load_format="auto", enable_multimodal=True, cache_capacity=4,
                     use_dynamic_prompt_cache=True, splitfuse_mode=True, splitfuse_block_size=8,
                     max_req_input_len=96, max_req_total_len=128, batch_max_tokens=128,
                     max_total_token_num=1024) as engine:
        def inputs(names):
            return [engine.image_processor(photo(n), hashlib.sha256(photo(n).tobytes()).hexdigest()) for n in names]

        streams = [engine.submit_images(prompt, greedy, inputs(names)) for prompt, names in cases]
        got = [[e.token_id for e in stream] for stream in streams]
        again = list(engine.submit_images(cases[0][0], greedy, inputs(cases[0][1])))
    assert again[0].cached_tokens > 0 and [e.token_id for e in again] == got[0]
    for (prompt, names), tokens in zip(cases, got):
        images = inputs_for_hf(names)
        ids = expand_placeholders(prompt, IMAGE, images)
        with torch.no_grad():
            out = hf_model.generate(**hf_inputs(ids, images), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert tokens == out[0, len(ids):].tolist()


def inputs_for_hf(names):
    return [Qwen2VLImageProcessor(**PROCESSOR)(photo(n)) for n in names]


def test_weight_map_reads_transformers_4_and_5_names(checkpoint, hf_model):
    """Published checkpoints (and transformers 5's save_pretrained) name the tensors `model.*` / `visual.*`;
    transformers 5's modules `model.language_model.*` / `model.visual.*`: both reach the weight map."""
    from jaxllm.models import qwen2_vl
    from jaxllm.weights import read_safetensors

    table = qwen2_vl.weights(ModelConfig.from_model_dir(checkpoint))
    saved = set(read_safetensors(checkpoint / "model.safetensors"))
    modules = set(hf_model.state_dict())
    assert any(n.startswith("model.language_model.") for n in modules) and any(n.startswith("visual.") for n in saved)
    assert {qwen2_vl.rename(n) for n in saved} == {qwen2_vl.rename(n) for n in modules} == set(table)
