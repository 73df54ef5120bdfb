"""Calibrated quantisation for `tools.convert --quant w4a16|w8a8 --calibration TEXT`: the 16-bit params, the
inputs their products see on the calibration text, then int4 weights by AWQ + clipping or GPTQ (w4a16,
W4A16_RECIPES) or SmoothQuant-smoothed int8 weights (w8a8), in the same pytree types as quantisation at
load, so the checkpoint loads unchanged."""

from __future__ import annotations

import numpy as np

from tools.convert.calibration import calibration_text, collect, token_windows
from tools.convert.convert import CALIBRATED

TOKENS = 8192  # calibration tokens (windows of WINDOW)
WINDOW = 512
SAMPLE_ROWS = {"w8a8": 1024, "awq": 2048}  # calibration rows per product on which α / clipping are chosen
# w4a16's recipes, the default first (docs/perf.md, "Calibrated conversion", measures them): AWQ's
# activation-aware scales, per-group clipping and scale fit (tools/convert/awq.py), or GPTQ (tools/convert/gptq.py).
W4A16_RECIPES = ("awq", "gptq")


def quantised_paths(quant_model) -> list[tuple[str, ...]]:
    """Param paths of the weights `quant_model` declares quantised."""
    import jax
    from flax import linen as nn

    from jaxllm.models import quant
    from jaxllm.weights import abstract_params

    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(quant_model)), is_leaf=quant.is_quantised)[0]
    return [tuple(k.key for k in path) for path, leaf in leaves if quant.is_quantised(leaf)]


def method(scheme: str, recipe: str | None) -> str:
    """The calibration a scheme runs: w8a8 → SmoothQuant ("w8a8"); w4a16 → `recipe` (default the first of
    W4A16_RECIPES)."""
    if scheme == "w4a16":
        recipe = recipe or W4A16_RECIPES[0]
        if recipe not in W4A16_RECIPES:
            raise ValueError(f"unknown w4a16 recipe {recipe!r} (choose {', '.join(W4A16_RECIPES)})")
        return recipe
    if recipe is not None:
        raise ValueError(f"a recipe is chosen for w4a16 only, not {scheme}")
    return scheme


def calibrated_params(model16, params16, quant_model, windows: list[list[int]], log=print, recipe: str | None = None):
    """params for `quant_model` (the same config with `weight_quant` set) from the unquantised `params16`
    of `model16` (best float32: the calibration runs it), calibrated on the token `windows`."""
    scheme = quant_model.config.weight_quant.scheme
    if scheme not in CALIBRATED:
        raise ValueError(f"--calibration is built for {', '.join(CALIBRATED)}, not {scheme}")
    how = method(scheme, recipe)
    paths = quantised_paths(quant_model)
    log(f"calibration ({how}): {sum(map(len, windows))} tokens in {len(windows)} windows, {len(paths)} weights")
    # AWQ's sample keeps each window's first row: the attention sink's large activations, which every later
    # position reads, must come through its scales and clipping (left out: max logit diff 55).
    stats = collect(model16, params16, windows, paths, gram=how == "gptq", sample_rows=SAMPLE_ROWS.get(how, 0),
                    keep_first=how == "awq")
    return quantise(params16, quant_model, stats, log, how)


def quantise(params16, quant_model, stats: dict, log=print, how: str | None = None):
    """params for `quant_model` from the unquantised `params16` and the calibration statistics of each
    quantised weight (calibration.collect: Gram matrices for GPTQ, sample rows for AWQ, absmax and sample
    rows for SmoothQuant); `how`: method()'s answer (default: the scheme's default)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from jaxllm.models import quant
    from jaxllm.weights import abstract_params, tree_get, tree_set

    scheme = quant_model.config.weight_quant.scheme
    how = how or method(scheme, None)
    host = jax.tree.map(lambda a: np.array(a, np.float32), params16)
    scales: dict = {}
    if how == "awq":
        from tools.convert.awq import scale_model

        scales = scale_model(host, quant_model.config, stats)
        log(f"awq: {len(scales)} of {len(stats)} products scaled, α "
            f"{', '.join(f'{a}: {sum(v == a for _, v in scales.values())}' for a in sorted({v for _, v in scales.values()}))}")
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
        elif how == "gptq":
            tree_set(out, path, gptq_weight(w, stats[path].gram, like))
        elif how == "awq":
            rows = stats[path].sample if path not in scales else stats[path].sample / scales[path][0]
            tree_set(out, path, awq_weight(w, rows, like))
        else:
            tree_set(out, path, quant.quantize_like(jnp.asarray(w, quant_model.dtype), like))
    return out


def text_windows(tokenizer, source: str, tokens: int = TOKENS, window: int = WINDOW) -> list[list[int]]:
    """The calibration text `source` (calibration.calibration_text) tokenised, in windows."""
    return token_windows(tokenizer.encode(calibration_text(source)), tokens, window)


def gptq_weight(w: np.ndarray, gram: np.ndarray, like):
    """The Int4Weight of `like`'s layout for the 16-bit w [*in, *out], by GPTQ on the Gram matrix of its
    flattened inputs."""
    from tools.convert.gptq import gptq_int4
    from tools.convert.int4 import int4_weight

    flat = w.reshape(gram.shape[0], -1)
    return int4_weight(*gptq_int4(flat, gram, like.group_size, np.dtype(like.scale.dtype)), like)


def awq_weight(w: np.ndarray, rows: np.ndarray, like):
    """The Int4Weight of `like`'s layout for the (already scaled) 16-bit w [*in, *out], each group's range
    clipped for the least output error on its input `rows` [R, K]."""
    from tools.convert.awq import clipped_int4
    from tools.convert.int4 import int4_weight

    flat = w.reshape(rows.shape[1], -1)
    return int4_weight(*clipped_int4(flat, rows, like.group_size, np.dtype(like.scale.dtype)), like)
