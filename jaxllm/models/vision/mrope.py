"""M-RoPE positions (Qwen2-VL): each token's (temporal, height, width) rotary positions in a request whose
prompt holds images (transformers' `get_rope_index`), for any span of its positions — a prompt chunk or later
tokens alike — from the images' places and patch grids alone.

A text token's three positions are one value, one past the previous token's largest; an image's tokens sit on
its merged grid (t, row, column) from that value, and the text after it continues from the value plus the
grid's longer side. So every token at or past an image's end is shifted by max(h, w) − h·w (in merged
patches) per image before it: generated tokens at index p have position p + `offset(images)` on all axes."""

from __future__ import annotations

from typing import Sequence

import numpy as np

ImagePlace = tuple[int, tuple[int, ...]]  # (first position of the image's tokens, its patch grid (t, h, w))


def _merged(grid: tuple[int, ...], merge_size: int) -> tuple[int, int]:
    t, h, w = grid
    if t != 1:
        raise ValueError(f"an image has one frame, not {t} (videos are not served)")
    return h // merge_size, w // merge_size


def offset(images: Sequence[ImagePlace], merge_size: int) -> int:
    """What a token past every image adds to its index to get its rotary position (≤ 0; transformers'
    `rope_deltas`)."""
    total = 0
    for _, grid in images:
        rows, cols = _merged(grid, merge_size)
        total += max(rows, cols) - rows * cols
    return total


def positions(images: Sequence[ImagePlace], merge_size: int, start: int, stop: int) -> np.ndarray:
    """[3, stop − start] int32 rotary positions of the request's positions start..stop (`images` in order)."""
    shift, last_end = 0, 0
    for first, grid in images:
        rows, cols = _merged(grid, merge_size)
        shift, last_end = shift + max(rows, cols) - rows * cols, first + rows * cols
    if start >= last_end:  # past every image (decode steps): the index shifted on all three axes
        out = np.empty((3, stop - start), np.int32)
        out[:] = np.arange(start + shift, stop + shift)
        return out
    index = np.arange(start, stop)
    out = np.broadcast_to(index, (3, stop - start)).astype(np.int32)
    shift = 0  # the shift of the tokens between the previous image and this one
    for first, grid in images:
        rows, cols = _merged(grid, merge_size)
        end = first + rows * cols
        lo, hi = max(first, start), min(end, stop)
        if lo < hi:  # image tokens in the span: on the image's grid from its first position's value
            j = np.arange(lo, hi) - first
            base = first + shift
            out[:, lo - start : hi - start] = np.stack([np.full_like(j, base), base + j // cols, base + j % cols])
        shift += max(rows, cols) - rows * cols
        if end < stop:
            out[:, max(end, start) - start :] += max(rows, cols) - rows * cols
    return out


def prompt_images(token_ids: Sequence[int], image_token_id: int, grids: Sequence[tuple[int, ...]],
                  merge_size: int) -> list[ImagePlace]:
    """The images' places in an expanded prompt whose image tokens are `image_token_id` (each image's
    h·w / merge² of them, in order). ValueError when the prompt's image tokens and the images disagree."""
    places, at = [], 0
    ids = list(token_ids)
    for grid in grids:
        rows, cols = _merged(grid, merge_size)
        try:
            at = ids.index(image_token_id, at)
        except ValueError:
            raise ValueError(f"the prompt has image tokens for {len(places)} of its {len(grids)} images") from None
        if ids[at : at + rows * cols] != [image_token_id] * (rows * cols):
            raise ValueError(f"image {len(places)} takes {rows * cols} tokens; the prompt has fewer in a row")
        places.append((at, tuple(grid)))
        at += rows * cols
    if image_token_id in ids[at:]:
        raise ValueError(f"the prompt has more image tokens than its {len(grids)} images take")
    return places
