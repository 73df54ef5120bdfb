"""Write a checkpoint as an orbax model directory: params loaded by jaxllm onto a `--tp` mesh and saved
with `jaxllm.weights.save_orbax`, beside config.json and the tokenizer (`load_format="auto"` finds it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tools.convert.checkpoint import DTYPES, Checkpoint, ConvertError
from tools.convert.hf_export import write_config, write_tokenizer, write_weights

_STAGING_WEIGHTS = "_safetensors"  # HF weights written first, read back by jaxllm, then removed


def write_orbax(dst: Path, checkpoint: Checkpoint, dtype_name: str, tp: int, quant: str | None = None,
                calibration: str | None = None, recipe: str | None = None) -> Path:
    """config.json, tokenizer files and `dst/orbax` (params in `dtype_name`) in `dst` (existing, empty);
    `quant`: the matmul weights quantised with that scheme (config.json's `quantization_config` says so),
    calibrated on the text `calibration` when given (tools/convert/calibrated.py; `recipe`: w4a16's, default
    the best measured), else round to nearest."""
    import jax.numpy as jnp

    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model
    from jaxllm.models.quant import WeightQuant, quantization_config
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import load_hf, save_orbax

    extra = {} if quant is None else {"quantization_config": quantization_config(WeightQuant(quant))}
    write_config(dst, checkpoint, dtype_name, extra)
    write_tokenizer(dst, checkpoint)
    staging = dst / _STAGING_WEIGHTS
    staging.mkdir()
    write_weights(staging, checkpoint.tensors, DTYPES[dtype_name])
    model = build_model(ModelConfig.from_hf_dict({**checkpoint.config, **extra}), jnp.dtype(dtype_name))
    if calibration is not None and model.config.moe is not None:  # the calibration measures dense products only
        raise ConvertError("--calibration is not built for mixtures of experts: --quant without it rounds to nearest")
    try:
        if calibration is None:
            params = load_hf(model, staging, make_mesh(tp), tp)
        else:
            params = _calibrated(model, staging, dst, calibration, recipe)
    except ValueError as err:
        raise ConvertError(f"jaxllm cannot load these weights: {err}") from err
    target = save_orbax(params, dst)
    shutil.rmtree(staging)
    return target


def _calibrated(quant_model, staging: Path, dst: Path, calibration: str, recipe: str | None):
    """The quantised params of `quant_model`, calibrated: the unquantised model loaded in float32 (one device)
    and run over the calibration text."""
    import dataclasses

    import jax.numpy as jnp

    from jaxllm.engine.detokenizer import load_tokenizer
    from jaxllm.models import build_model
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import load_hf
    from tools.convert.calibrated import calibrated_params, text_windows

    model16 = build_model(dataclasses.replace(quant_model.config, weight_quant=None), jnp.float32)
    params16 = load_hf(model16, staging, make_mesh(1), 1)
    windows = text_windows(load_tokenizer(str(dst), "fast"), calibration)
    return calibrated_params(model16, params16, quant_model, windows, recipe=recipe)
