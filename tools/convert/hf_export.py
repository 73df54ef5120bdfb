"""Write a checkpoint as a Hugging Face model directory: safetensors (one file, or shards with an index),
config.json, generation_config.json and the tokenizer files, all readable by transformers 4.x and 5.x."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.convert.checkpoint import DTYPES, Checkpoint, LazyTensor
from tools.convert.portable import make_tokenizer_portable, portable_config

MAX_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SAFETENSORS_NAMES = {
    np.dtype(np.float64): "F64",
    DTYPES["float32"]: "F32",
    DTYPES["float16"]: "F16",
    DTYPES["bfloat16"]: "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
}


def _target_dtype(tensor: LazyTensor, dtype: np.dtype) -> np.dtype:
    """Floating tensors take the output dtype; integer tensors keep theirs."""
    return dtype if np.issubdtype(tensor.dtype, np.floating) or tensor.dtype == DTYPES["bfloat16"] else tensor.dtype


def _stored_bytes(tensor: LazyTensor, dtype: np.dtype) -> int:
    return int(np.prod(tensor.shape, dtype=np.int64)) * _target_dtype(tensor, dtype).itemsize


def plan_shards(tensors: dict[str, LazyTensor], dtype: np.dtype, max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most `max_bytes` (a larger single tensor gets its own file)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = _stored_bytes(tensor, dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors_file(path: Path, tensors: dict[str, LazyTensor], dtype: np.dtype, progress: tqdm) -> int:
    """Stream tensors into one .safetensors file, reading (and casting) one tensor at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = _stored_bytes(tensor, dtype)
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[_target_dtype(tensor, dtype)],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(np.uint64(len(encoded)).tobytes())
        f.write(encoded)
        for name, tensor in tensors.items():
            values = np.asarray(tensor.read())
            if tuple(values.shape) != tensor.shape:
                raise ValueError(f"{name}: read shape {values.shape}, declared {tensor.shape}")
            stored = np.ascontiguousarray(values.astype(_target_dtype(tensor, dtype), copy=False))
            f.write(stored.reshape(-1).view(np.uint8).data)  # bytes view: bfloat16 has no buffer format
            progress.update(1)
    return offset


def write_weights(
    dst: Path, tensors: dict[str, LazyTensor], dtype: np.dtype, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    shards = plan_shards(tensors, dtype, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    with tqdm(total=len(tensors), desc="writing weights", unit="tensor") as progress:
        for file_name, shard in zip(names, shards):
            total += write_safetensors_file(dst / file_name, {n: tensors[n] for n in shard}, dtype, progress)
            weight_map.update({n: file_name for n in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [dst / n for n in names]


def write_config(dst: Path, checkpoint: Checkpoint, dtype_name: str, extra: dict | None = None) -> None:
    """config.json (recording the stored dtype, plus the `extra` keys; readable by transformers 4.x and 5.x)
    and generation_config.json when known."""
    config = {**portable_config(checkpoint.config), **(extra or {})}
    config["torch_dtype"] = dtype_name
    if "dtype" in config:  # transformers >= 5 writes "dtype"
        config["dtype"] = dtype_name
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if checkpoint.generation_config:
        (dst / "generation_config.json").write_text(json.dumps(checkpoint.generation_config, indent=2) + "\n")


def write_tokenizer(dst: Path, checkpoint: Checkpoint) -> None:
    """The source's tokenizer files, made readable by transformers 4.x and 5.x alike."""
    checkpoint.write_tokenizer(dst)
    if not (dst / "tokenizer_config.json").is_file():
        print("warning: the source has no tokenizer files; writing weights and config only", file=sys.stderr)
        return
    make_tokenizer_portable(dst)


def write_hf(dst: Path, checkpoint: Checkpoint, dtype_name: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """A complete HF model directory in `dst` (which exists and is empty)."""
    write_config(dst, checkpoint, dtype_name)
    write_tokenizer(dst, checkpoint)
    write_weights(dst, checkpoint.tensors, DTYPES[dtype_name], max_shard_bytes)
