"""Write a checkpoint as an orbax model directory: params loaded by jaxllm onto a `--tp` mesh and saved
with `jaxllm.weights.save_orbax`, beside config.json and the tokenizer (`load_format="auto"` finds it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tools.convert.checkpoint import DTYPES, Checkpoint, ConvertError
from tools.convert.hf_export import write_config, write_tokenizer, write_weights

_STAGING_WEIGHTS = "_safetensors"  # HF weights written first, read back by jaxllm, then removed


def write_orbax(dst: Path, checkpoint: Checkpoint, dtype_name: str, tp: int) -> Path:
    """config.json, tokenizer files and `dst/orbax` (params in `dtype_name`) in `dst` (existing, empty)."""
    import jax.numpy as jnp

    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import load_hf, save_orbax

    write_config(dst, checkpoint, dtype_name)
    write_tokenizer(dst, checkpoint)
    staging = dst / _STAGING_WEIGHTS
    staging.mkdir()
    write_weights(staging, checkpoint.tensors, DTYPES[dtype_name])
    model = build_model(ModelConfig.from_hf_dict(checkpoint.config), jnp.dtype(dtype_name))
    try:
        params = load_hf(model, staging, make_mesh(tp), tp)
    except ValueError as err:
        raise ConvertError(f"jaxllm cannot load these weights: {err}") from err
    target = save_orbax(params, dst)
    shutil.rmtree(staging)
    return target
