"""Write a checkpoint as a Hugging Face model directory: safetensors (one file, or shards with an index),
config.json, generation_config.json and the tokenizer files (chat template inside tokenizer_config.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.convert.checkpoint import DTYPES, Checkpoint, LazyTensor

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
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_LOAD_TIME_KEYS = ("is_local", "local_files_only")  # transformers records how it loaded, not what it is


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
    """config.json (recording the stored dtype, plus the `extra` keys) and generation_config.json when known."""
    config = {**checkpoint.config, **(extra or {})}
    config["torch_dtype"] = dtype_name
    if "dtype" in config:  # transformers >= 5 writes "dtype"
        config["dtype"] = dtype_name
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if checkpoint.generation_config:
        (dst / "generation_config.json").write_text(json.dumps(checkpoint.generation_config, indent=2) + "\n")


def write_tokenizer(dst: Path, checkpoint: Checkpoint) -> None:
    """The source's tokenizer files, then made self-contained: the chat template also inside
    tokenizer_config.json and a special_tokens_map.json, which older readers expect."""
    checkpoint.write_tokenizer(dst)
    config_path = dst / "tokenizer_config.json"
    if not config_path.is_file():
        print("warning: the source has no tokenizer files; writing weights and config only", file=sys.stderr)
        return
    config = json.loads(config_path.read_text())
    for key in _LOAD_TIME_KEYS:
        config.pop(key, None)
    template_path = dst / "chat_template.jinja"
    if "chat_template" not in config and template_path.is_file():
        config["chat_template"] = template_path.read_text()
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_path = dst / "special_tokens_map.json"
    if not special_path.is_file():
        special = {key: config[key] for key in _SPECIAL_TOKENS if config.get(key) is not None}
        special_path.write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def write_hf(dst: Path, checkpoint: Checkpoint, dtype_name: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """A complete HF model directory in `dst` (which exists and is empty)."""
    write_config(dst, checkpoint, dtype_name)
    write_tokenizer(dst, checkpoint)
    write_weights(dst, checkpoint.tensors, DTYPES[dtype_name], max_shard_bytes)
