"""The sanity floor of the GPU benchmarks: Hugging Face transformers' own `generate` (PyTorch) on random
weights of a real config, at the batch sizes jaxllm is measured at. Needs torch; never imported by jaxllm.

    python -m tools.hf_baseline --config tests/assets/configs/llama-3-8b.json --batch 1 64 --input-len 128 --output-len 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    import torch
    import transformers

    p = argparse.ArgumentParser(prog="python -m tools.hf_baseline", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--result-json", default=None)
    ns = p.parse_args(argv)

    config = transformers.AutoConfig.for_model(**json.loads(Path(ns.config).read_text()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=ns.output_len, min_new_tokens=ns.output_len, eos_token_id=None,
        pad_token_id=0,
    )
    rows = []
    for batch in ns.batch:
        ids = torch.randint(0, min(30000, config.vocab_size), (batch, ns.input_len), device=device)
        model.generate(ids[:, :16], generation_config=transformers.GenerationConfig(
            do_sample=False, max_new_tokens=4, eos_token_id=None, pad_token_id=0))  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, generation_config=gen)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        new_tokens = (out.shape[1] - ns.input_len) * batch
        rows.append({"batch": batch, "seconds": seconds, "output_tokens": new_tokens,
                     "output_tok_s": new_tokens / seconds})
        print(f"transformers generate batch {batch}: {new_tokens / seconds:.1f} output tok/s ({seconds:.2f} s)")
    if ns.result_json:
        Path(ns.result_json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
