"""CLI: `python -m jaxllm.bench serve ...` against a running server, `python -m jaxllm.bench offline ...`,
`python -m jaxllm.bench quality ...` (what the weight-quantisation modes cost in quality), `python -m jaxllm.bench
startup ...` (the server's start-up, cold and warm)."""

from __future__ import annotations

import argparse
import json
import sys

from jaxllm.bench import quality
from jaxllm.bench.stats import format_table, summarize
from jaxllm.bench.workload import WorkloadSpec, build_workload


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (minimum with --input-len-max)")
    p.add_argument("--input-len-max", type=int, default=None, help="uniform random prompt lengths up to this")
    p.add_argument("--output-len", type=int, default=128, help="new tokens (minimum with --output-len-max)")
    p.add_argument("--output-len-max", type=int, default=None)
    p.add_argument("--dataset", type=str, default=None, help='JSONL file: {"prompt": str, "output_len"?: int}')
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="random prompts all open with the same this many tokens (before their --input-len own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="constrain every answer to the JSON schema in FILE (guided_json): constrained decoding's cost")
    p.add_argument("--result-json", type=str, default=None, help="also write the results here")


def _spec(ns: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(
        num_prompts=ns.num_prompts, input_len=ns.input_len, output_len=ns.output_len,
        input_len_max=ns.input_len_max, output_len_max=ns.output_len_max, dataset=ns.dataset, seed=ns.seed,
        shared_prefix_len=ns.shared_prefix_len,
    )


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: engine flags pass through unparsed, and `--mode` must not be taken for `--model_dir`.
    parser = argparse.ArgumentParser(prog="python -m jaxllm.bench", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", allow_abbrev=False, help="load-test a running server")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000")
    serve.add_argument("--api", choices=["lightllm", "openai"], default="lightllm")
    serve.add_argument("--model", default="default", help="model name sent with the OpenAI API")
    serve.add_argument("--tokenizer", required=True, help="model directory whose tokenizer makes the prompts")
    serve.add_argument("--request-rate", type=float, default=float("inf"),
                       help="Poisson arrival rate in requests/s (inf: all at once)")
    serve.add_argument("--max-concurrency", type=int, default=None)
    serve.add_argument("--client-processes", type=int, default=1,
                       help="client processes the requests are dealt to (each its own event loop): one process "
                            "reading hundreds of streams falls behind and sees tokens in clumps")
    serve.add_argument("--api-key", default=None,
                       help="sent as `Authorization: Bearer KEY`, for a server started with --api_key")
    _add_workload_flags(serve)
    offline = sub.add_parser("offline", allow_abbrev=False,
                             help="throughput of the in-process engine; extra flags go to the engine",
                             epilog="Any jaxllm.serve flag may follow, e.g. --max_total_token_num 200000.")
    offline.add_argument("--model_dir", required=True)
    offline.add_argument("--warmup", type=int, default=None,
                         help="start-up shapes to compile before timing (default: the engine's set; 0: none)")
    offline.add_argument("--warmup-pass", action="store_true",
                         help="run the whole workload once untimed first, so no compilation is timed")
    offline.add_argument("--best-of", type=int, default=1,
                         help="sequences per prompt: a group sharing the prompt's KV (sampled, seeded)")
    offline.add_argument("--separately", action="store_true",
                         help="with --best-of: run each prompt's sequences as separate requests instead")
    offline.add_argument("--score", action="store_true",
                         help="reward models: the prompts' prefill throughput on --model_dir's causal LM (one new "
                              "token each), then their scoring throughput on the same config with a random "
                              "one-label score head (/get_score's engine path); needs --load_format dummy")
    _add_workload_flags(offline)
    quality.add_arguments(sub.add_parser("quality", allow_abbrev=False,
                                         help="perplexity, greedy agreement and logit error per weight mode"))
    startup = sub.add_parser("startup", allow_abbrev=False,
                             help="the server's launch to /health, cold and warm, with its phases",
                             epilog="Any jaxllm.serve flag may follow (they start the server).")
    startup.add_argument("--model_dir", required=True)
    startup.add_argument("--runs", nargs="+", choices=["cold", "warm"], default=["cold", "warm"],
                         help="starts in order: cold empties the compilation cache first, warm keeps it")
    startup.add_argument("--cache-dir", default=None,
                         help="the compilation cache the starts use (emptied by a cold run; default: a temporary one)")
    startup.add_argument("--timeout", type=float, default=1200, help="seconds a start may take")
    startup.add_argument("--result-json", type=str, default=None, help="also write the results here")
    return parser


def _engine_overrides(argv: list[str]) -> dict:
    """jaxllm.serve flags given after the benchmark's own, as keyword overrides for `jaxllm.LLM`."""
    from jaxllm.args import build_parser as server_parser

    parser = server_parser()
    ns = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(ns).items()
                 if v != parser.get_default(k) and k not in ("model_dir", "multiprocess")}
    if ns.multiprocess:  # --nccl_port given, even at its default value: one process per device
        overrides["nccl_port"] = ns.nccl_port
    return overrides


def _read_json(path: str | None):
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    ns, extra = build_parser().parse_known_args(argv)
    if ns.command == "quality":
        if extra:
            raise SystemExit(f"jaxllm.bench: unknown arguments {extra}")
        return quality.run(ns)
    if ns.command == "startup":
        from jaxllm.bench import startup

        result = startup.run(ns.model_dir, extra, ns.runs, ns.cache_dir, ns.timeout)
        _write_json(ns.result_json, result)
        print(startup.format_table(result))
        return 0
    spec = _spec(ns)
    if ns.command == "serve":
        if extra:
            raise SystemExit(f"jaxllm.bench: unknown arguments {extra}")
        from jaxllm.bench.client import run_load_in_processes
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ns.tokenizer)
        requests = list(build_workload(spec, tokenizer))
        prompts = [r.prompt_text or tokenizer.decode(r.prompt_ids) for r in requests]
        timings, duration = run_load_in_processes(
            ns.base_url, requests, prompts, processes=ns.client_processes, api=ns.api, model=ns.model,
            request_rate=ns.request_rate, max_concurrency=ns.max_concurrency, seed=ns.seed, api_key=ns.api_key,
            json_schema=_read_json(ns.json_schema),
        )
        result = summarize(timings, duration)
        table = format_table(result)
    else:
        from jaxllm import LLM
        from jaxllm.bench.offline import (format_offline_table, format_score_table, run_offline, schema_grammar,
                                          score_against_prefill)

        if ns.score:
            result = score_against_prefill(ns.model_dir, list(build_workload(spec)), warmup=ns.warmup,
                                           warmup_pass=ns.warmup_pass, **_engine_overrides(extra))
            table = format_score_table(result)
        else:
            llm = LLM(ns.model_dir, warmup=ns.warmup, **_engine_overrides(extra))
            requests = list(build_workload(spec, llm.tokenizer if spec.dataset else None))
            guided = schema_grammar(ns.json_schema)
            if ns.warmup_pass:  # compiles every shape the workload meets; the persistent cache keeps them
                run_offline(llm, requests, ns.best_of, ns.separately, guided)
            result = run_offline(llm, requests, ns.best_of, ns.separately, guided)
            table = format_offline_table(result)
    _write_json(ns.result_json, result)
    print(table)
    return 0 if result.get("failed", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
