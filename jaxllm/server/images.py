"""A request's images (LightLLM's `multimodal_params.images`, OpenAI's `image_url` content parts) → the engine's
`ImageInput`s: base64 decoded or fetched over HTTP(S) (LightLLM's REQUEST_TIMEOUT, default 3 s, and a size
cap), decoded by PIL and preprocessed off the event loop. Any failure is a 400 naming the image's field."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import io
import os
from typing import Any

import aiohttp
from PIL import Image

from jaxllm.server.errors import ApiError, invalid

MAX_IMAGE_BYTES = 20 * 2**20  # an image's encoded bytes
MAX_IMAGE_PIXELS = 8192 * 8192  # decoded width × height (a small file may decode huge)
FETCH_TIMEOUT_S = float(os.environ.get("REQUEST_TIMEOUT", "3"))  # LightLLM's name and default


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One image as the request gave it: `kind` "base64" or "url", `field` names it in errors."""

    field: str
    kind: str
    data: str


def lightllm_images(body: dict) -> list[ImageRef]:
    """`multimodal_params.images`: a list of {"type": "base64" | "url", "data": str}."""
    mm = body.get("multimodal_params")
    if mm is None:
        return []
    if not isinstance(mm, dict):
        raise invalid("multimodal_params: expected an object", "multimodal_params")
    images = mm.get("images", [])
    if not isinstance(images, list):
        raise invalid("multimodal_params.images: expected a list", "multimodal_params.images")
    refs = []
    for i, item in enumerate(images):
        field = f"multimodal_params.images[{i}]"
        if not isinstance(item, dict) or item.get("type") not in ("base64", "url") or not isinstance(item.get("data"), str):
            raise invalid(f'{field}: expected {{"type": "base64" or "url", "data": string}}', field)
        refs.append(ImageRef(field, item["type"], item["data"]))
    return refs


def image_url_part(field: str, part: dict) -> ImageRef:
    """An OpenAI `{"type": "image_url", "image_url": {"url": ...}}` part: a data URL or an http(s) URL."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise invalid(f"{field}.image_url.url: expected a string", field)
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise invalid(f"{field}: a data URL must be data:<type>;base64,<data>", field)
        return ImageRef(field, "base64", data)
    if url.startswith(("http://", "https://")):
        return ImageRef(field, "url", url)
    raise invalid(f"{field}: the url must be a data: URL or an http(s) URL", field)


def check_placeholders(engine, prompt_ids: list[int], refs: list[ImageRef], where: str) -> None:
    """The prompt's image placeholders must equal the images in number (400 naming `where`)."""
    if not refs:
        return
    if engine.image_processor is None:
        raise _no_images(refs[0])
    vision = engine.config.vision
    count = sum(1 for t in prompt_ids if t == vision.image_token_id)
    if count != len(refs):
        raise invalid(f"{where}: the prompt has {count} image placeholders ({vision.placeholder}) for "
                      f"{len(refs)} images", where)


async def load_images(engine, refs: list[ImageRef]) -> tuple:
    """The engine's ImageInputs of `refs`, in order (400 naming the first image that fails)."""
    if not refs:
        return ()
    if engine.image_processor is None:
        raise _no_images(refs[0])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)) as session:
        data = await asyncio.gather(*(_image_bytes(session, ref) for ref in refs))
    return tuple(await asyncio.gather(*(asyncio.to_thread(_preprocess, engine.image_processor, ref, raw)
                                        for ref, raw in zip(refs, data))))


async def _image_bytes(session: aiohttp.ClientSession, ref: ImageRef) -> bytes:
    if ref.kind == "base64":
        if len(ref.data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise _too_large(ref)
        try:
            return base64.b64decode(ref.data, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"{ref.field}: not valid base64", ref.field) from None
    try:
        async with session.get(ref.data) as response:
            if response.status != 200:
                raise invalid(f"{ref.field}: fetching {ref.data} answered HTTP {response.status}", ref.field)
            if (response.content_length or 0) > MAX_IMAGE_BYTES:
                raise _too_large(ref)
            raw = await response.content.read(MAX_IMAGE_BYTES + 1)
            if len(raw) > MAX_IMAGE_BYTES:
                raise _too_large(ref)
            return raw
    except asyncio.TimeoutError:
        raise invalid(f"{ref.field}: fetching {ref.data} took longer than {FETCH_TIMEOUT_S:g} s", ref.field) from None
    except aiohttp.ClientError as exc:
        raise invalid(f"{ref.field}: fetching {ref.data} failed ({type(exc).__name__}: {exc})", ref.field) from None


def _no_images(ref: ImageRef) -> ApiError:
    return invalid(f"{ref.field}: images need a vision-language model (LLaVA) served with --enable_multimodal",
                   ref.field)


def _too_large(ref: ImageRef) -> ApiError:
    return invalid(f"{ref.field}: the image is larger than {MAX_IMAGE_BYTES} bytes", ref.field)


def _preprocess(processor, ref: ImageRef, raw: bytes) -> Any:
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
    except Exception:  # noqa: BLE001 - whatever PIL raises for bytes that are no image
        raise invalid(f"{ref.field}: not an image (PIL cannot read it)", ref.field) from None
    if width * height > MAX_IMAGE_PIXELS:
        raise invalid(f"{ref.field}: {width}×{height} pixels is more than {MAX_IMAGE_PIXELS}", ref.field)
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
        raise invalid(f"{ref.field}: the image cannot be decoded ({exc})", ref.field) from None
    return processor(image, hashlib.md5(raw).hexdigest())
