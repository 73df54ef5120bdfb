"""The contract between the multimodal pipeline and a vision family (LLaVA's CLIP tower, Qwen2-VL's tower).

A vision-language checkpoint is an ordinary `Family` (`jaxllm/models/family.py`, registered by `model_type`)
whose `config()` sets `ModelConfig.vision` to a frozen `VisionConfig` subclass and whose weight map also places
the vision tower's and projector's tensors under the param subtree `VISION_PARAMS`. Everything else the pipeline
needs from the family comes through `VisionFamily`, found by `VisionConfig.family` in
`jaxllm/models/vision/registry.py`.

The pipeline (server → engine) uses it so:
1. `processor(config, model_dir)` once; then per request, off the engine thread, `processor(image)` turns
   a decoded PIL image into an `ImageInput` (plain data: it crosses process boundaries).
2. The prompt's text carries `VisionConfig.placeholder` once per image (the chat template or the user puts it
   there); after tokenisation each `image_token_id` is expanded to `ImageInput.num_tokens` copies
   (`expand_placeholders`), whose input embeddings the model replaces with the image's embeddings.
3. `build_model` makes `encoder(config, dtype)` the language model's submodule `VISION_PARAMS`; on the
   engine thread, images not in the image cache are encoded in batches of equal `pixels.shape` and `grid`:
   the encoder's `__call__(pixels [batch, *ImageInput.pixels.shape], grid)` returns
   `[batch, num_tokens, text hidden]` (the projector applied), which replace the placeholders' embeddings.
4. Families whose language model takes multi-axis rotary positions (Qwen2-VL's M-RoPE) also provide
   `rope_positions(token_ids, images)`; others return None (positions are 0..n-1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import flax.linen as nn
    from PIL import Image

    from jaxllm.config import ModelConfig
    from jaxllm.models.hf_map import WeightMap

VISION_PARAMS = "vision"  # the param subtree holding the vision tower and its projector


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """What the pipeline reads of every vision family's config (families subclass it with their own fields).
    family: the `VisionFamily` name in the vision registry; image_token_id: the placeholder's token id after
    tokenisation; placeholder: the placeholder's text ("<image>")."""

    family: str
    image_token_id: int
    placeholder: str

    def check_tp(self, tp: int) -> None:
        """ValueError when --tp cannot split the tower's heads and MLP (families with a tower override it)."""


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One preprocessed image. pixels: what the encoder reads for it (CLIP: [3, H, W] float32; Qwen2-VL:
    [patches, C·T·P·P]); num_tokens: the embeddings it becomes, so the placeholder tokens it takes in the
    prompt; grid: the family's static shape info, part of the batching key (Qwen2-VL: (t, h, w) patches; ()
    when the pixel shape says all); digest: hex hash of the image's bytes (the image cache's key)."""

    pixels: np.ndarray
    num_tokens: int
    digest: str
    grid: tuple[int, ...] = ()


class ImageProcessor(Protocol):
    """The family's preprocessing, equal to transformers' image processor for the checkpoint (read from its
    preprocessor_config.json when present). `max_tokens`: the most tokens one image can become (sizes the
    image cache's embedding buffer: --cache_capacity × max_tokens rows)."""

    max_tokens: int

    def __call__(self, image: "Image.Image", digest: str) -> ImageInput: ...


class VisionFamily(Protocol):
    """A vision family: preprocessing, the Flax encoder (tower + projector) and, for M-RoPE models, positions."""

    name: str

    def processor(self, config: "ModelConfig", model_dir: Path | None) -> ImageProcessor: ...

    def encoder(self, config: "ModelConfig", dtype) -> "nn.Module":
        """A module whose `__call__(pixels [batch, *pixel shape], grid)` → [batch, num_tokens, text hidden];
        its params are `params[VISION_PARAMS]`, declared with logical axes ("heads", "mlp" split over --tp)."""
        ...

    def example_pixels(self, config: "ModelConfig") -> tuple[np.ndarray, tuple[int, ...]]:
        """(pixels [1, *pixel shape], grid): the smallest valid encoder input (traces the params at init)."""
        ...

    def weights(self, config: "ModelConfig") -> "WeightMap":
        """HF tensor name (after the family's `rename`) → Target with a path under (VISION_PARAMS, ...)."""
        ...

    def rope_positions(self, token_ids: list[int], images: list[ImageInput]) -> np.ndarray | None:
        """[axes, len(token_ids)] int32 rotary positions of an expanded prompt (M-RoPE), or None for 0..n-1."""
        ...


def expand_placeholders(token_ids: list[int], image_token_id: int, images: list[ImageInput]) -> list[int]:
    """`token_ids` with the i-th `image_token_id` repeated images[i].num_tokens times. ValueError when the
    placeholders and the images differ in number."""
    count = sum(1 for t in token_ids if t == image_token_id)
    if count != len(images):
        raise ValueError(f"the prompt has {count} image placeholders for {len(images)} images")
    out: list[int] = []
    images_left = iter(images)
    for t in token_ids:
        out.extend([t] * next(images_left).num_tokens if t == image_token_id else [t])
    return out
