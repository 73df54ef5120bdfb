"""The converter's in-between form: an HF-layout checkpoint whose tensors are read lazily, one at a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

# --dtype names → numpy dtypes (bfloat16 through ml_dtypes, as jaxllm.weights reads it).
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


class ConvertError(Exception):
    """A conversion that cannot proceed; the CLI prints its message on one line and exits with status 2."""


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor's shape and dtype, known up front, and how to read its values (HF layout, numpy)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]


@dataclasses.dataclass
class Checkpoint:
    """Everything a model directory holds, in Hugging Face terms, as read from one source."""

    config: dict[str, Any]  # config.json
    tensors: dict[str, LazyTensor]  # HF tensor name → tensor, in the order they are written
    source_dtype: str  # a key of DTYPES: the dtype kept when no --dtype is given
    write_tokenizer: Callable[[Path], None]  # writes the tokenizer files into a directory
    generation_config: dict[str, Any] | None = None  # generation_config.json, when the source has one


def dtype_name(dtype: np.dtype) -> str:
    """The DTYPES key of a numpy floating dtype."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ConvertError(f"unsupported weight dtype {dtype}")
