"""`python -m jaxllm.bench quality`: what each weight-quantisation mode costs in quality, against the same
model's unquantised weights, on a fixed English text: perplexity, greedy (argmax) token agreement and the
largest logit difference, every position of the text teacher-forced through both models.

The text: the English jokes of the PyPI package `pyjokes` (version 0.8.3, `pyjokes.get_jokes("en", "all")`,
one per line; `pip install pyjokes==0.8.3`), tokenised by the model's tokenizer and cut into windows of
`--window` tokens, each scored from its start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

TEXT_PACKAGE = "pyjokes==0.8.3"
DEFAULT_MODES = ("triton_w8a16", "triton_w4a16", "triton_w8a8", "fp8_w8a8")


def reference_text() -> str:
    """The fixed English text (see the module docstring)."""
    try:
        import pyjokes
    except ImportError as err:
        raise SystemExit(f"jaxllm.bench quality needs the text package: pip install {TEXT_PACKAGE}") from err
    return "\n".join(pyjokes.get_jokes(language="en", category="all"))


def windows(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of `window` tokens (the last one shorter), each scored from its own start."""
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


class Scorer:
    """All-position logits of one model on token windows (one jitted step per window length)."""

    def __init__(self, model_dir: str, dtype, weight_mode: str | None):
        from jaxllm.config import ModelConfig, read_hf_config
        from jaxllm.models import build_model
        from jaxllm.models.quant import with_weight_mode
        from jaxllm.parallel import make_mesh
        from jaxllm.weights import load_params

        raw = read_hf_config(model_dir)
        config = with_weight_mode(ModelConfig.from_hf_dict(raw), weight_mode, raw)
        self.model = build_model(config, dtype)
        self.params = load_params(self.model, model_dir, make_mesh(1), 1)
        self._step = jax.jit(lambda p, t, m, c: self.model.apply({"params": p}, t, m, c, all_logits=True)[0])

    def logits(self, ids: list[int]) -> np.ndarray:  # [len(ids), vocab] float32
        from jaxllm.models import one_sequence

        meta, cache = one_sequence(self.model, len(ids))
        return np.asarray(self._step(self.params, jnp.asarray(ids, jnp.int32), meta, cache))


@dataclasses.dataclass
class Quality:
    mode: str
    perplexity: float
    ppl_change: float  # relative to the unquantised model
    agreement: float  # fraction of positions whose argmax equals the unquantised model's
    max_logit_diff: float
    tokens: int


def _nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """Negative log-likelihood of each next token [n - 1]."""
    shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(ids) - 1), ids[1:]]


def compare(model_dir: str, modes, dtype, window: int, text: str, quantised_dirs=()) -> list[Quality]:
    """The 16-bit model of `model_dir` against each weight mode (quantised at load) and each of
    `quantised_dirs` (checkpoints written by `tools.convert --quant`, loaded as they are)."""
    from jaxllm.engine.detokenizer import load_tokenizer

    ids = load_tokenizer(model_dir, "fast").encode(text)
    chunks = windows(ids, window)
    print(f"{len(ids)} tokens in {len(chunks)} windows; scoring the unquantised model", flush=True)
    base = Scorer(model_dir, dtype, None)
    base_logits = [base.logits(c) for c in chunks]
    del base
    base_nll = np.concatenate([_nll(lg, c) for lg, c in zip(base_logits, chunks)])
    base_ppl = math.exp(base_nll.mean())
    results = [Quality("16-bit", base_ppl, 0.0, 1.0, 0.0, len(base_nll))]
    runs = [(mode, model_dir, mode) for mode in modes] + [(path, path, None) for path in quantised_dirs]
    for label, directory, mode in runs:
        print(f"scoring {label}", flush=True)
        scorer = Scorer(directory, dtype, mode)
        nll, agree, diff = [], [], 0.0
        for chunk, ref in zip(chunks, base_logits):
            got = scorer.logits(chunk)
            nll.append(_nll(got, chunk))
            agree.append(got.argmax(-1) == ref.argmax(-1))
            diff = max(diff, float(np.abs(got - ref).max()))
        ppl = math.exp(np.concatenate(nll).mean())
        results.append(Quality(label, ppl, ppl / base_ppl - 1, float(np.concatenate(agree).mean()), diff,
                               len(base_nll)))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
        del scorer
    return results


def format_table(results: list[Quality]) -> str:
    lines = ["| mode | perplexity | vs 16-bit | greedy agreement | max logit diff |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.mode} | {r.perplexity:.3f} | {r.ppl_change:+.2%} | {r.agreement:.4f} | "
                     f"{r.max_logit_diff:.3f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", required=True)
    p.add_argument("--modes", nargs="*", default=list(DEFAULT_MODES), help="weight modes to compare (quantised at load)")
    p.add_argument("--quantised-dirs", nargs="*", default=[],
                   help="also score these model directories written by `tools.convert --quant` (same model)")
    p.add_argument("--data_type", default="float32", help="dtype of both models (float32 on the CPU)")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--result-json", default=None)


def run(ns: argparse.Namespace) -> int:
    from jaxllm.weights import DATA_TYPES

    results = compare(ns.model_dir, ns.modes, DATA_TYPES[ns.data_type], ns.window, reference_text(),
                      ns.quantised_dirs)
    if ns.result_json:
        with open(ns.result_json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
    print(f"{results[0].tokens} scored tokens of {TEXT_PACKAGE}'s English jokes, {ns.data_type}")
    print(format_table(results))
    return 0
