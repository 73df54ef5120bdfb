"""A Hugging Face model directory → checkpoint: config.json, safetensors tensors (memory-mapped), tokenizer
and generation config files copied as they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jaxllm.config import ModelConfig
from jaxllm.weights import hf_weight_files, read_weight_file
from tools.convert.checkpoint import Checkpoint, ConvertError, LazyTensor, dtype_name

# Tokenizer files of any HF tokenizer flavour (fast, sentencepiece, BPE), copied when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConvertError(f"{src} has no config.json (not a Hugging Face model directory)")
    config = json.loads(path.read_text())
    try:
        ModelConfig.from_hf_dict(config)
    except (ValueError, KeyError) as err:
        raise ConvertError(f"unsupported architecture in {path}: {err}") from err
    return config


def _tensors(src: Path) -> dict[str, LazyTensor]:
    try:
        files = hf_weight_files(src)
    except FileNotFoundError as err:
        raise ConvertError(str(err)) from err
    tensors = {}
    for file in files:
        for name, array in read_weight_file(file).items():
            tensors[name] = LazyTensor(tuple(array.shape), array.dtype, lambda a=array: a)
    return tensors


def _tokenizer_copier(src: Path):
    def copy(dst: Path) -> None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)

    return copy


def read_hf(src: str | Path) -> Checkpoint:
    """The HF directory as a checkpoint; the dtype kept by default is that of its token embedding."""
    src = Path(src)
    config = _read_config(src)
    tensors = _tensors(src)
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # a saved copy of the tied embedding; jaxllm reads the embedding
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise ConvertError(f"{src} has no model.embed_tokens.weight")
    generation_path = src / "generation_config.json"
    return Checkpoint(
        config=config,
        tensors=tensors,
        source_dtype=dtype_name(embed.dtype),
        write_tokenizer=_tokenizer_copier(src),
        generation_config=json.loads(generation_path.read_text()) if generation_path.is_file() else None,
    )
