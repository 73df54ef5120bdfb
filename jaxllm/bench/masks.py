"""What a step's grammar work costs the engine thread with the mask worker process (jaxllm.engine.mask_client),
measured on the host without a model: `rows` requests under one JSON schema walk their grammars at random (each
step's token drawn from its row's allowed set); per step the engine's calls as the step loop makes them: the
tokens taken (start_advance), the next masks asked (start_fill), the advance answer awaited, the masks copied in.
Reports per step: a bare round trip to the worker (an empty advance), the advance answer's wait, the masks' wait
and the worker's own fill time, against the same rows filled in this process (llguidance's parallel fill):

    python -m jaxllm.bench.masks --tokenizer MODEL_DIR [--rows 64] [--steps 200] [--schema FILE] [--words W]
        [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxllm.engine.mask_client import GrammarConstraint, Grammars, tokenizer_json
from jaxllm.engine.request import Guided

DEFAULT_SCHEMA = Path(__file__).parent / "schemas" / "records.json"


def _median_us(seconds: list[float]) -> str:
    values = np.asarray(seconds) * 1e6
    return f"median {np.median(values):8.1f} µs, p90 {np.percentile(values, 90):8.1f} µs"


def allowed_token(row: np.ndarray, vocab: int, rng: np.random.Generator) -> int:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
    return int(rng.choice(np.flatnonzero(bits)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a model directory with a (fast) tokenizer")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--schema", default=str(DEFAULT_SCHEMA))
    parser.add_argument("--words", type=int, default=None, help="the model's mask width (default: the tokenizer's)")
    parser.add_argument("--threads", type=int, default=None, help="llguidance's threads (default: the worker's)")
    ns = parser.parse_args(argv)
    from transformers import AutoTokenizer

    import llguidance

    from jaxllm.engine.grammar import GrammarCompiler, StepRows

    tokenizer = AutoTokenizer.from_pretrained(ns.tokenizer)
    eos = [tokenizer.eos_token_id]
    text = tokenizer_json(tokenizer)
    vocab = llguidance.LLTokenizer(text, eos_token=eos[0]).vocab_size
    words = ns.words or (vocab + 31) // 32
    spec = Guided("json_schema", Path(ns.schema).read_text())
    grammars = Grammars(tokenizer, eos, ns.rows, words, ns.threads)
    started = time.perf_counter()
    constraints = [grammars.constraint(spec) for _ in range(ns.rows)]
    print(f"worker start and {ns.rows} constraints: {time.perf_counter() - started:.2f} s")
    filler = StepRows(vocab, tuple(eos), ns.threads)
    local = GrammarCompiler(llguidance.LLTokenizer(text, eos_token=eos[0]), families=2 * filler.threads)
    local_matchers = [local.matcher(spec.kind, spec.value, spec.field) for _ in range(ns.rows)]
    worker = grammars.worker()
    rng = np.random.default_rng(0)
    rows = list(range(ns.rows))
    mask = np.full((ns.rows, words), -1, np.int32)
    GrammarConstraint.start_fill([(c, i) for i, c in enumerate(constraints)])(mask)
    ping, advance_wait, fill_wait, worker_fill, local_fill, local_take = [], [], [], [], [], []
    for _ in range(ns.steps):
        t = time.perf_counter()
        worker.wait(worker.post(("advance", [])))
        ping.append(time.perf_counter() - t)
        if any(c.complete for c in constraints):
            break
        tokens = [allowed_token(mask[i], vocab, rng) for i in rows]
        t = time.perf_counter()
        answers = GrammarConstraint.start_advance(list(zip(constraints, tokens)))
        finish_fill = GrammarConstraint.start_fill([(c, i) for i, c in enumerate(constraints)])
        errors = answers()
        advance_wait.append(time.perf_counter() - t)
        assert not any(errors), errors[0][:200]
        t = time.perf_counter()
        failed, build_s = finish_fill(mask)
        fill_wait.append(time.perf_counter() - t)
        worker_fill.append(build_s)
        assert not failed, failed[0]
        t = time.perf_counter()
        assert not any(filler.take(list(zip(local_matchers, tokens))))
        local_take.append(time.perf_counter() - t)
        block = np.zeros((ns.rows, words), np.int32)
        t = time.perf_counter()
        filler.fill(local_matchers, block)
        local_fill.append(time.perf_counter() - t)
        assert (block == mask).all(), "the worker's rows differ from this process's"
    grammars.close()
    print(json.dumps({"rows": ns.rows, "steps": len(fill_wait), "words": words}))
    print(f"round trip (empty advance):            {_median_us(ping)}")
    print(f"advance sent → answered ({ns.rows} tokens):    {_median_us(advance_wait)}")
    print(f"masks awaited after the advance answer: {_median_us(fill_wait)}")
    print(f"the worker's fill ({ns.rows} rows):             {_median_us(worker_fill)}")
    print(f"the same tokens taken in this process:  {_median_us(local_take)}")
    print(f"the same rows filled in this process:   {_median_us(local_fill)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
