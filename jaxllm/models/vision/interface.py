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
   engine thread, the images new to the image cache are grouped into `EncodeBatch`es by the family's
   `batches(config, images, max_batch)` (`stacked_batches` for images that stack: equal pixel shapes and grids),
   and each batch is one call `encoder(*batch.inputs, grid=batch.static)` → `[B, T, text hidden]` (the projector
   applied), whose rows replace the placeholders' embeddings.
4. Families whose language model takes multi-axis rotary positions (Qwen2-VL's M-RoPE) also provide
   `rope_positions(config, images, start, stop)`, which the runner sends with every step
   (`AttentionMetadata.rope_positions`); others' positions are 0..n-1.
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


@dataclasses.dataclass(frozen=True)
class EncodeBatch:
    """One encoder call. images: indices (into the list given to `batches`) of the images in its rows, in row
    order (rows past them are padding); inputs: host arrays for `encoder(*inputs, grid=static)`, padded to the
    family's bucketed shapes (few compiled shapes); token_index [B, T] int32: which of its image's embeddings
    output (b, t) is, -1 for padding outputs (written nowhere)."""

    images: tuple[int, ...]
    inputs: tuple[np.ndarray, ...]
    static: tuple
    token_index: np.ndarray


def pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def stacked_batches(images: list[ImageInput], max_batch: int) -> list[EncodeBatch]:
    """Batches of images whose pixels stack (equal `pixels.shape` and `grid`), at most `max_batch` each, padded
    to a power of two of rows with zero images."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((image.pixels.shape, image.grid), []).append(i)
    batches = []
    for (shape, grid), members in groups.items():
        for at in range(0, len(members), max_batch):
            chunk = members[at : at + max_batch]
            rows = pow2(len(chunk))
            pixels = np.zeros((rows, *shape), np.float32)
            pixels[: len(chunk)] = np.stack([images[i].pixels for i in chunk])
            tokens = images[chunk[0]].num_tokens
            index = np.full((rows, tokens), -1, np.int32)
            index[: len(chunk)] = np.arange(tokens, dtype=np.int32)
            batches.append(EncodeBatch(tuple(chunk), (pixels,), grid, index))
    return batches


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
        """A module whose `__call__(*EncodeBatch.inputs, grid=EncodeBatch.static)` → [B, T, text hidden]; its
        params are `params[VISION_PARAMS]`, declared with logical axes ("heads", "mlp" split over --tp)."""
        ...

    def batches(self, config: "ModelConfig", images: list[ImageInput], max_batch: int) -> list[EncodeBatch]:
        """The images grouped into encoder calls of at most `max_batch` images (`stacked_batches` when they
        stack)."""
        ...

    def example_batch(self, config: "ModelConfig") -> EncodeBatch:
        """The smallest valid encoder call (traces the params at init)."""
        ...

    def warmup_batches(self, config: "ModelConfig", max_batch: int) -> list[EncodeBatch]:
        """The encoder calls worth compiling at start-up (written to the scratch row): every batch size real
        images will meet when their size is fixed, else the example."""
        ...

    def weights(self, config: "ModelConfig") -> "WeightMap":
        """HF tensor name (after the family's `rename`) → Target with a path under (VISION_PARAMS, ...)."""
        ...

    def rope_positions(self, config: "ModelConfig", images: list[tuple[int, tuple[int, ...]]], start: int,
                       stop: int) -> np.ndarray:
        """M-RoPE families only (`config.rope.mrope_section`): [3, stop - start] int32 rotary positions of a
        request's positions start..stop, from its prompt's images' (first position, grid) in order."""
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
