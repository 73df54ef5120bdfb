"""Qwen2-VL image preprocessing, equal to transformers' `Qwen2VLImageProcessor` (PIL backend): resize to a grid
of multiples of patch × merge within the pixel budget (bicubic), rescale to [0, 1], normalise, and cut into
patches in the order the vision tower reads them (each 2 × 2 merge block's patches adjacent)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from jaxllm.models.vision.clip_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_rgb
from jaxllm.models.vision.interface import ImageInput

MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class Qwen2VLImageProcessor:
    """The processor's settings (`preprocessor_config.json`); defaults are transformers'."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, raw: dict) -> "Qwen2VLImageProcessor":
        size = raw.get("size") or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        # transformers 5 writes the pixel budget as size = {shortest_edge: min, longest_edge: max}
        values.setdefault("min_pixels", size.get("shortest_edge", cls.min_pixels))
        values.setdefault("max_pixels", size.get("longest_edge", cls.max_pixels))
        for name in ("image_mean", "image_std"):
            if name in values:
                values[name] = tuple(float(x) for x in values[name])
        return cls(**values)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "Qwen2VLImageProcessor":
        path = Path(model_dir) / "preprocessor_config.json"
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else cls()

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """transformers' `smart_resize`: the nearest multiples of patch × merge, scaled (aspect kept) into
        [min_pixels, max_pixels]. ValueError for an aspect ratio past 200."""
        factor = self.patch_size * self.merge_size
        if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
            raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} passes "
                             f"{MAX_ASPECT_RATIO}")
        h, w = round(height / factor) * factor, round(width / factor) * factor
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return h, w

    @property
    def max_tokens(self) -> int:
        """The most language-model tokens one image becomes (the pixel budget over a merged patch's pixels)."""
        return self.max_pixels // (self.patch_size * self.merge_size) ** 2

    def num_tokens(self, height: int, width: int) -> int:
        """Language-model tokens of an image of this size (before decoding it)."""
        h, w = self.resized_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def __call__(self, image, digest: str = "") -> ImageInput:
        """A PIL image (any mode; transparency composited on white) → its patches [h·w, C·T·P·P] float32 and
        patch grid (1, h, w); it takes h·w / merge² language-model tokens."""
        rgb = to_rgb(image)
        height, width = self.resized_size(rgb.height, rgb.width)
        if self.num_tokens(rgb.height, rgb.width) > self.max_tokens:  # a minimum budget near the maximum
            raise ValueError(f"a {rgb.width}×{rgb.height} image passes the processor's {self.max_tokens} tokens")
        resized = np.asarray(rgb.resize((width, height), resample=Image.Resampling.BICUBIC))  # [H, W, 3] uint8
        pixels = (resized.astype(np.float64) / 255.0).astype(np.float32)
        pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return self.patchify(pixels.transpose(2, 0, 1), digest)

    def patchify(self, pixels: np.ndarray, digest: str = "") -> ImageInput:
        """pixels [C, H, W] (H, W multiples of patch × merge) → patches [h·w, C·T·P·P], merge blocks row-major
        and each block's patches row-major; the one frame repeated over the temporal patch."""
        c, height, width = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        # [blocks down, blocks across, m, m, C, P, P]
        blocks = pixels.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        patches = np.ascontiguousarray(frames.reshape(gh * gw, c * t * p * p))
        return ImageInput(patches, num_tokens=gh * gw // m ** 2, digest=digest, grid=(1, gh, gw))

