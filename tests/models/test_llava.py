"""LLaVA-1.5 against transformers: the CLIP preprocessing on real photographs (equal to
`CLIPImageProcessorPil` / `LlavaImageProcessorPil`), and the logits of a prompt with two images (the
tower's features replacing the placeholders' embeddings) equal to `LlavaForConditionalGeneration`'s
(float32, ≤ 1e-4) at --tp 1 and 2, with the checkpoint saved by transformers 5 and named as on the Hub."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache
from jaxllm.models.transformer import CausalLM
from jaxllm.models.vision.interface import expand_placeholders
from jaxllm.models.vision.registry import vision_family
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_hf
from tests.models.hf_oracle import prefill_meta
from tests.models.llava_helpers import IMAGE_TOKEN, TINY_LLAVA, photo, save_tiny_llava

@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    return path, save_tiny_llava(path)


def legacy_names(name: str) -> str:
    """transformers 5's tensor name → transformers 4's (llava-hf checkpoints on the Hub)."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "camera"])
@pytest.mark.parametrize("pad", [False, True])
def test_preprocessing_matches_transformers(tmp_path, name, pad):
    """CLIP's shortest-edge resize, center crop, rescale and normalise (after LLaVA's pad to square when
    asked) on photographs of several aspect ratios, one grayscale."""
    hf = LlavaImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 42, "width": 42}, do_pad=pad)
    hf.save_pretrained(tmp_path)
    config = ModelConfig.from_hf_dict(dict(TINY_LLAVA))
    ours = vision_family("clip").processor(config, tmp_path)(photo(name), digest="x")
    expected = hf(photo(name), return_tensors="np")["pixel_values"][0]
    assert ours.pixels.shape == expected.shape == (3, 42, 42) and ours.num_tokens == 9
    np.testing.assert_allclose(ours.pixels, expected, atol=1e-6, rtol=0)


def test_rgba_over_white(tmp_path):
    rgba = photo("coffee").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}).save_pretrained(tmp_path)
    ours = vision_family("clip").processor(ModelConfig.from_hf_dict(dict(TINY_LLAVA)), tmp_path)(rgba, "x")
    expected = CLIPImageProcessorPil.from_pretrained(tmp_path)(rgba, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours.pixels, expected, atol=1e-6, rtol=0)


def oracle_and_ours(path: Path, hf_model, tp: int, names=("chelsea", "astronaut")):
    """transformers' logits and ours for a prompt with one placeholder per photograph."""
    config = ModelConfig.from_model_dir(path)
    processor = vision_family("clip").processor(config, path)
    images = [processor(photo(n), digest=n) for n in names]
    rng = np.random.default_rng(tp)
    text = [int(t) for t in rng.integers(3, 400, size=14)]
    for at in (3, 9)[: len(names)]:
        text[at] = IMAGE_TOKEN
    tokens = expand_placeholders(text, IMAGE_TOKEN, images)
    pixels = np.stack([im.pixels for im in images])
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor([tokens]), pixel_values=torch.tensor(pixels)).logits[0].numpy()
    model = build_model(config, jnp.float32)
    params = load_hf(model, path, make_mesh(tp), tp)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, grid=(), method=CausalLM.encode_images))
    features = encode(params, jnp.asarray(pixels))
    mask = np.asarray(tokens) == IMAGE_TOKEN
    embeds = np.zeros((len(tokens), config.hidden_size), np.float32)
    embeds[mask] = np.asarray(features).reshape(-1, config.hidden_size)
    step = jax.jit(lambda p, t, m, c, e, k: model.apply({"params": p}, t, m, c, all_logits=True, image_embeds=e,
                                                          image_mask=k))
    logits, _ = step(params, jnp.asarray(tokens, jnp.int32), prefill_meta(len(tokens), 64), init_kv_cache(model, 64),
                     jnp.asarray(embeds), jnp.asarray(mask))
    return np.asarray(logits), expected


def save_hub_names(hf_model, src: Path, dst: Path) -> None:
    """`hf_model` as llava-hf's checkpoints on the Hub name it (`language_model.model.*`,
    `vision_tower.vision_model.*`), with `src`'s configs."""
    tensors = {legacy_names(k): v.numpy() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("vision_tower.vision_model.") for k in tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    for name in ("config.json", "preprocessor_config.json"):
        (dst / name).write_text((src / name).read_text())


@pytest.mark.parametrize("tp, names", [(1, "hub"), (2, "saved")])
def test_logits_match_transformers(tiny_llava, tmp_path, tp, names):
    """At --tp 1 from a checkpoint named as on the Hub, at --tp 2 as transformers 5 saves it."""
    path, hf_model = tiny_llava
    if names == "hub":
        save_hub_names(hf_model, path, tmp_path)
        path = tmp_path
    ours, expected = oracle_and_ours(path, hf_model, tp)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_vision_config():
    """llava-1.5-7b's config: 576 tokens per 336 px image from the second-to-last of 24 CLIP layers."""
    raw = json.loads((Path(__file__).resolve().parent.parent / "assets" / "configs" / "llava-1.5-7b.json").read_text())
    config = ModelConfig.from_hf_dict(raw)
    assert config.vision.num_tokens == 576 and config.vision.layers_used == 23
    assert config.vision.image_token_id == 32000 and config.num_layers == 32 and config.hidden_size == 4096
    with pytest.raises(ValueError, match="vision tower's num_attention_heads"):
        config.vision.check_tp(3)


def test_warmup_batches_are_the_shapes_real_images_meet(tmp_path):
    """CLIP's start-up encoder calls: one per power-of-two batch up to the stage's batch, each the shape
    `batches` makes for that many real images (so a burst compiles nothing new)."""
    config = ModelConfig.from_hf_dict(dict(TINY_LLAVA))
    family = vision_family("clip")
    processor = family.processor(config, None)
    names = ["chelsea", "coffee", "astronaut", "camera"]
    images = [processor(photo(names[i % 4]), digest=str(i)) for i in range(16)]
    warm = family.warmup_batches(config, 16)
    assert [b.inputs[0].shape[0] for b in warm] == [1, 2, 4, 8, 16]
    for count in (1, 2, 3, 5, 16):
        (real,) = family.batches(config, images[:count], 16)
        (match,) = [b for b in warm if b.inputs[0].shape == real.inputs[0].shape]
        assert match.token_index.shape == real.token_index.shape and match.static == real.static
