"""XLA options a model's weights ask for, set in XLA_FLAGS before the GPU backend starts (XLA reads them then).

w8a8 (int8 activations): left to itself, XLA fuses the activations' int8 conversion into Triton GEMMs of its own
for the attention's products, which ran at 490-580 TOPS on the H200 where cuBLAS ran the MLP's at 800-1,180.
Without Triton GEMM fusions every int8 product goes to cuBLAS: the batch-256 step over 8 layers took 2.39
against 2.58 ms, and the 16-bit step did not move (2.60 ms either way; docs/perf.md, session 23). A flag the
user already set about Triton GEMMs stands.
"""

from __future__ import annotations

import logging
import os

from jax._src import xla_bridge

log = logging.getLogger(__name__)

TRITON_GEMM_OPTION = "xla_gpu_enable_triton_gemm"
INT8_GEMMS_ON_CUBLAS = f"--{TRITON_GEMM_OPTION}=false"


def weights_of(args):
    """The weight quantisation (a quant.WeightQuant, or None) a server with these flags will run: --mode's, else
    what the checkpoint's config.json says it holds. From the flags and config.json alone, so that it can come
    before anything starts the backend; None where they cannot say (load_model reports why)."""
    from jaxllm.config import read_hf_config
    from jaxllm.models.backends import resolve_modes
    from jaxllm.models.quant import WeightQuant, checkpoint_quant

    try:
        mode = resolve_modes(args.mode).weight_mode
        return WeightQuant.from_mode(mode, 1) if mode else checkpoint_quant(read_hf_config(args.model_dir))
    except (ValueError, OSError, TypeError):
        return None


def for_weights(weight_quant) -> str | None:
    """Add what `weight_quant` (a quant.WeightQuant, or None) asks of XLA to XLA_FLAGS; returns the flag added,
    or None (nothing asked, the user's own setting, or the backend already started: logged)."""
    if weight_quant is None or weight_quant.scheme != "w8a8":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if TRITON_GEMM_OPTION in flags:
        return None
    if xla_bridge.backends_are_initialized():
        log.info("the JAX backend started before the w8a8 weights were known: XLA keeps its Triton GEMM fusions for "
                 "the int8 products (XLA_FLAGS=%s before starting sends them all to cuBLAS)", INT8_GEMMS_ON_CUBLAS)
        return None
    os.environ["XLA_FLAGS"] = f"{flags} {INT8_GEMMS_ON_CUBLAS}".strip()
    return INT8_GEMMS_ON_CUBLAS
