"""Process 0 of a two-process `--tp 2 --nccl_port PORT` deployment of the tiny config (run by
test_multiprocess.py with one CPU device per process): generates WORKLOAD, prints the tokens as one JSON line,
then kills its follower and prints the error the next request ends with."""

from __future__ import annotations

import json
import sys

from engine_helpers import TEST_FLAGS

from jaxllm.engine.request import SamplingParams

SHARED = [17, 3, 99, 140, 23, 61, 250, 8, 77, 12, 201, 45, 9, 130, 66, 31, 4]  # a prompt-cache prefix (table fills)
WORKLOAD = [
    (SHARED + [5, 6, 7], SamplingParams(max_new_tokens=6, ignore_eos=True)),
    (SHARED + [200, 11], SamplingParams(max_new_tokens=6, ignore_eos=True)),
    ([9, 10, 11], SamplingParams(max_new_tokens=6, ignore_eos=True, do_sample=True, temperature=0.8, top_k=20,
                                 seed=7)),
]
FLAGS = {**TEST_FLAGS, "tp": 2, "use_dynamic_prompt_cache": True}


def run(engine) -> list[list[int]]:
    """WORKLOAD's token ids, one list per request, the first request alone (so the others find its prefix)."""
    first = [e.token_id for e in engine.submit(*WORKLOAD[0])]
    rest = engine.submit_many([(ids, params, None) for ids, params in WORKLOAD[1:]])
    return [first] + [[e.token_id for e in stream] for stream in rest]


def main(model_dir: str, port: int) -> None:
    from jaxllm.offline import LLM

    llm = LLM(model_dir, warmup=0, nccl_port=port, **FLAGS)
    print(json.dumps({"tokens": run(llm.engine)}), flush=True)
    follower = llm.engine.runner.peers.processes[0]
    follower.kill()
    follower.wait()
    last = list(llm.engine.submit([5, 6, 7], SamplingParams(max_new_tokens=3)))[-1]
    print(json.dumps({"finish_reason": last.finish_reason, "error": last.error}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
