"""Calibrated quantisation for `tools.convert --quant w4a16|w8a8 --calibration TEXT`: the 16-bit params, the
inputs their products see on the calibration text, then GPTQ int4 weights (w4a16) or SmoothQuant-smoothed
int8 weights (w8a8), in the same pytree types as quantisation at load, so the checkpoint loads unchanged."""

from __future__ import annotations

import numpy as np

from tools.convert.calibration import calibration_text, collect, token_windows
from tools.convert.convert import CALIBRATED

TOKENS = 8192  # calibration tokens (windows of WINDOW)
WINDOW = 512
SAMPLE_ROWS = 1024  # calibration rows per product on which SmoothQuant's α is chosen


def quantised_paths(quant_model) -> list[tuple[str, ...]]:
    """Param paths of the weights `quant_model` declares quantised."""
    import jax
    from flax import linen as nn

    from jaxllm.models import quant
    from jaxllm.weights import abstract_params

    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(quant_model)), is_leaf=quant.is_quantised)[0]
    return [tuple(k.key for k in path) for path, leaf in leaves if quant.is_quantised(leaf)]


def calibrated_params(model16, params16, quant_model, windows: list[list[int]], log=print):
    """params for `quant_model` (the same config with `weight_quant` set) from the unquantised `params16`
    of `model16` (best float32: the calibration runs it), calibrated on the token `windows`."""
    scheme = quant_model.config.weight_quant.scheme
    if scheme not in CALIBRATED:
        raise ValueError(f"--calibration is built for {', '.join(CALIBRATED)}, not {scheme}")
    paths = quantised_paths(quant_model)
    log(f"calibration: {sum(map(len, windows))} tokens in {len(windows)} windows, {len(paths)} weights")
    stats = collect(model16, params16, windows, paths, gram=scheme == "w4a16",
                    sample_rows=SAMPLE_ROWS if scheme == "w8a8" else 0)
    return quantise(params16, quant_model, stats, log)


def quantise(params16, quant_model, stats: dict, log=print):
    """params for `quant_model` from the unquantised `params16` and the calibration statistics of each
    quantised weight (calibration.collect: Gram matrices for w4a16, absmax and sample rows for w8a8)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from jaxllm.models import quant
    from jaxllm.weights import abstract_params, tree_get, tree_set

    scheme = quant_model.config.weight_quant.scheme
    host = jax.tree.map(lambda a: np.array(a, np.float32), params16)
    if scheme == "w8a8":
        from tools.convert.smoothquant import smooth

        chosen = smooth(host, quant_model.config, stats)
        log(f"smoothquant: {len(chosen)} of {len(stats)} products smoothed, α "
            f"{', '.join(f'{a}: {sum(v == a for v in chosen.values())}' for a in sorted(set(chosen.values())))}")
    out: dict = {}
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(quant_model)), is_leaf=quant.is_quantised)[0]
    for path, like in ((tuple(k.key for k in p), leaf) for p, leaf in leaves):
        w = tree_get(host, path)
        if not quant.is_quantised(like):
            tree_set(out, path, jnp.asarray(w, like.dtype))
        elif scheme == "w4a16":
            tree_set(out, path, gptq_weight(w, stats[path].gram, like))
        else:
            tree_set(out, path, quant.quantize_like(jnp.asarray(w, quant_model.dtype), like))
    return out


def text_windows(tokenizer, source: str, tokens: int = TOKENS, window: int = WINDOW) -> list[list[int]]:
    """The calibration text `source` (calibration.calibration_text) tokenised, in windows."""
    return token_windows(tokenizer.encode(calibration_text(source)), tokens, window)


def gptq_weight(w: np.ndarray, gram: np.ndarray, like):
    """The Int4Weight of `like`'s layout for the 16-bit w [*in, *out], by GPTQ on the Gram matrix of its
    flattened inputs."""
    import jax.numpy as jnp

    from jaxllm.models import quant
    from tools.convert.gptq import gptq_int4

    in_shape, out_shape = w.shape[: like.in_axes], w.shape[like.in_axes :]
    k, n = int(np.prod(in_shape)), int(np.prod(out_shape))
    group = like.group_size
    q, scale, zero = gptq_int4(w.reshape(k, n), gram, group, np.dtype(like.scale.dtype))
    axis = like.in_axes - 1
    packed = quant.pack_int4(jnp.asarray(q.reshape(*in_shape, *out_shape)), axis=axis)
    grouped = (*in_shape[:-1], in_shape[-1] // group, *out_shape)
    dtype = like.scale.dtype
    return quant.Int4Weight(packed, jnp.asarray(scale.reshape(grouped), dtype), jnp.asarray(zero.reshape(grouped), dtype),
                            like.in_axes)
