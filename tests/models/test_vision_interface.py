"""The vision interface's shared pieces: placeholder expansion and batches of images that stack."""

import numpy as np
import pytest

from jaxllm.models.vision.interface import ImageInput, expand_placeholders, stacked_batches


def image(shape=(3, 4, 4), tokens=2, digest="x", fill=1.0):
    return ImageInput(np.full(shape, fill, np.float32), tokens, digest)


def test_expand_placeholders():
    images = [image(tokens=3), image(tokens=1)]
    assert expand_placeholders([5, 9, 6, 9], 9, images) == [5, 9, 9, 9, 6, 9]
    with pytest.raises(ValueError, match="1 image placeholders for 2 images"):
        expand_placeholders([5, 9], 9, images)


def test_stacked_batches_group_by_shape_and_pad_rows():
    images = [image(fill=i) for i in range(3)] + [image(shape=(3, 8, 8), tokens=5)]
    batches = stacked_batches(images, max_batch=2)
    assert [b.images for b in batches] == [(0, 1), (2,), (3,)]
    first, second, other = batches
    assert first.inputs[0].shape == (2, 3, 4, 4) and (first.inputs[0][1] == 1).all()
    assert second.inputs[0].shape == (1, 3, 4, 4) and second.token_index.tolist() == [[0, 1]]
    assert other.token_index.shape == (1, 5)
    (padded,) = stacked_batches(images[:3], max_batch=4)
    assert padded.inputs[0].shape[0] == 4 and padded.token_index[3].tolist() == [-1, -1]  # a padding row
