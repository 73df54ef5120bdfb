"""CLIP / LLaVA image preprocessing, step for step transformers' `CLIPImageProcessor` (PIL backend) and
`LlavaImageProcessor`: RGB (alpha over white), optional pad to square, resize of the shortest edge (bicubic),
center crop, rescale, normalise → [3, H, W] float32."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from jaxllm.models.vision.interface import ImageInput

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipImageProcessor:
    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    num_tokens: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_pad: bool = False  # LLaVA's pad to square (background: the mean colour), before the resize

    @classmethod
    def for_model(cls, vision, model_dir: Path | None) -> "ClipImageProcessor":
        """From the checkpoint's preprocessor_config.json when it has one, else CLIP's defaults at the tower's
        image size."""
        raw = {}
        path = Path(model_dir) / "preprocessor_config.json" if model_dir is not None else None
        if path is not None and path.is_file():
            raw = json.loads(path.read_text())
        size = raw.get("size") or {"shortest_edge": vision.image_size}
        if "shortest_edge" not in size:
            raise ValueError(f"{path}: size {size} is not a shortest_edge size (the CLIP processor's)")
        crop = raw.get("crop_size") or {"height": vision.image_size, "width": vision.image_size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if (crop["height"], crop["width"]) != (vision.image_size, vision.image_size):
            raise ValueError(f"{path}: crop_size {crop} differs from the vision tower's image_size {vision.image_size}")
        return cls(
            shortest_edge=int(size["shortest_edge"]), crop=(crop["height"], crop["width"]),
            num_tokens=vision.num_tokens,
            mean=tuple(raw.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(raw.get("image_std", OPENAI_CLIP_STD)),
            resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            **{k: bool(raw.get(k, getattr(cls, k))) for k in
               ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad")},
        )

    @property
    def max_tokens(self) -> int:
        return self.num_tokens

    def __call__(self, image: Image.Image, digest: str) -> ImageInput:
        return ImageInput(pixels=self.pixels(image), num_tokens=self.num_tokens, digest=digest)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """[3, crop height, crop width] float32."""
        image = to_rgb(image)
        if self.do_pad:
            image = pad_to_square(image, tuple(int(m * 255) for m in self.mean))
        if self.do_resize:
            width, height = image.size
            short, long = min(width, height), max(width, height)
            new_long = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
            image = image.resize(size, resample=self.resample)
        array = np.asarray(image).transpose(2, 0, 1)  # [3, H, W] uint8
        if self.do_center_crop:
            array = center_crop(array, *self.crop)
        if self.do_rescale:
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        array = array.astype(np.float32)
        if self.do_normalize:
            mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (self.mean, self.std))
            array = (array - mean) / std
        return np.ascontiguousarray(array, np.float32)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, an alpha channel composited over white (transformers' rule)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] → [C, height, width] about the centre, zero-padded where the image is smaller."""
    _, h, w = array.shape
    if h < height or w < width:
        new_h, new_w = max(h, height), max(w, width)
        padded = np.zeros((array.shape[0], new_h, new_w), array.dtype)
        top, left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        padded[:, top : top + h, left : left + w] = array
        array, h, w = padded, new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return array[:, top : top + height, left : left + width]
