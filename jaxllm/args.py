"""Every LightLLM api_server flag, defined once (same names, types, defaults), resolved into a frozen ServerArgs.

`ServerArgs.from_argv` parses, applies LightLLM's start-up checks and refuses flags whose feature is not
built yet (exit code 2, `jaxllm: --FLAG is not supported yet`); the rest of the code reads ServerArgs only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

DATA_TYPE_CHOICES = ["fp16", "float16", "bf16", "bfloat16", "fp32", "float32"]
LOAD_FORMATS = ["auto", "hf", "orbax", "dummy"]
TOOL_CALL_PARSERS = ["auto", "hermes", "llama3_json", "mistral"]  # jaxllm.server.tool_parsers

# Flags whose feature does not exist yet: any non-default value is refused at start-up.
UNSUPPORTED_FLAGS: tuple[str, ...] = ()


class ExplicitFlag(argparse.Action):
    """Stores the value and records that the flag was given (`multiprocess` for --nccl_port): LightLLM always runs
    one process per device, jaxllm only when asked to."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.multiprocess = True


def _truncation_mode(value: str) -> str | None:
    # LightLLM's choices include the Python value None; we also accept the string "None" on the command line.
    return None if value == "None" else value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m jaxllm.serve`: LightLLM's api_server flags plus `--load_format` and
    `--api_key`."""
    p = argparse.ArgumentParser(
        prog="python -m jaxllm.serve",
        description="Serve a Llama-family model over LightLLM's HTTP API (JAX, Pallas GPU kernels).",
    )
    add = p.add_argument
    add("--host", type=str, default="127.0.0.1", help="address to listen on")
    add("--port", type=int, default=8000, help="port to listen on")
    add("--model_dir", type=str, default=None,
        help="model directory: config.json, tokenizer files and weights are all read from it")
    add("--tokenizer_mode", type=str, default="slow",
        help="how to load the tokenizer: slow (Python tokenizer, quick to load, slow to run; handy for "
             "debugging), fast (Rust tokenizer, best throughput) or auto (fast, falling back to slow)")
    add("--load_way", type=str, default="HF",
        help="weight format: HF (Hugging Face layout, the default) or DS (DeepSpeed pipeline files, Llama only)")
    add("--max_total_token_num", type=int, default=6000,
        help="KV cache capacity in tokens, shared by all requests (about max batch × (input + output length))")
    add("--batch_max_tokens", type=int, default=None,
        help="cap on the prompt tokens of one new prefill batch, to bound its memory")
    add("--eos_id", nargs="+", type=int, default=[2], help="token ids that end generation")
    add("--running_max_req_size", type=int, default=1000, help="most requests processed at the same time")
    add("--tp", type=int, default=1, help="tensor-parallel degree: number of devices the model is split over")
    add("--max_req_input_len", type=int, default=2048, help="longest prompt accepted, in tokens")
    add("--max_req_total_len", type=int, default=2048 + 1024,
        help="longest prompt + generated length accepted, in tokens")
    add("--nccl_port", type=int, default=28765, action=ExplicitFlag,
        help="given explicitly with --tp > 1: run one process per device (process 0 serves HTTP, schedules and "
             "sends each step to the others, which run it on their device) and coordinate them with "
             "jax.distributed on this local port (default %(default)s). Without it, one process drives all --tp devices")
    p.set_defaults(multiprocess=False)
    add("--mode", type=str, default=[], nargs="+",
        help="kernel modes: triton_int8kv | ppl_int8kv (int8 KV cache, about twice the tokens), "
             "ppl_fp16 (fp16 decode attention), triton_flashdecoding (split-K decode for long contexts), "
             "triton_gqa_attention | triton_gqa_flashdecoding (grouped-query kernels), and the weight "
             "quantisation modes, weights quantised at load from 16-bit ones: triton_w8a16 (int8 per output "
             "channel), triton_w4a16 | lmdeploy_w4a16 | ppl_w4a16 (int4 with zero points, groups of 128), "
             "triton_w8a8 | ppl_w8a8 (int8 weights and per-token int8 activations), ppl_w8a8_mixdown (w8a8, "
             "the MLP down-projection 16-bit in config.json's `mixdown` layers, all when absent); and "
             "fp8_w8a8 (jaxllm's, not a LightLLM mode: float8 e4m3 weights and activations, per-channel and "
             "per-token scales)")
    add("--trust_remote_code", action="store_true",
        help="load model directories that ship their own code (config auto_map: InternLM2, Baichuan, Qwen-1, ...); "
             "the config is read by jaxllm's family module, the tokenizer's code runs in transformers")
    add("--disable_log_stats", action="store_true", help="do not log throughput statistics")
    add("--log_stats_interval", type=int, default=10, help="seconds between statistics log lines")
    add("--router_token_ratio", type=float, default=0.0,
        help="KV usage ratio above which the router estimates future use conservatively")
    add("--router_max_new_token_len", type=int, default=1024,
        help="cap on a request's expected new tokens when the router estimates future KV use")
    add("--router_max_wait_tokens", type=int, default=10,
        help="try to admit new requests after this many decode steps (with --splitfuse_mode new requests "
             "are admitted at every step, as prompt chunks ride along with the decodes)")
    add("--use_dynamic_prompt_cache", action="store_true",
        help="reuse the KV of shared prompt prefixes across requests (radix-tree prompt cache)")
    add("--splitfuse_block_size", type=int, default=256, help="prompt tokens per splitfuse step")
    add("--splitfuse_mode", action="store_true",
        help="split long prefills into chunks fused with the running decodes")
    add("--beam_mode", action="store_true", help="beam-search generation mode")
    add("--diverse_mode", action="store_true", help="diverse generation mode")
    add("--token_healing_mode", action="store_true",
        help="token healing (for code and text that stops mid-token): back the prompt up over its last tokens "
             "(up to 2) and hold the first generated tokens to ones consistent with the removed text")
    add("--enable_multimodal", action="store_true", help="load the extra models of multimodal checkpoints")
    add("--cache_capacity", type=int, default=200, help="capacity of the multimodal resource cache")
    add("--cache_reserved_ratio", type=float, default=0.5,
        help="share of the multimodal cache kept after a clean-up")
    add("--data_type", type=str, choices=DATA_TYPE_CHOICES, default="float16",
        help="dtype the weights are loaded and computed in")
    add("--return_all_prompt_logprobs", action="store_true",
        help="return the logprob of every prompt token in /generate answers")
    add("--use_reward_model", action="store_true", help="serve a reward model (/get_score)")
    add("--long_truncation_mode", type=_truncation_mode, choices=[None, "head", "center"], default=None,
        help="what to do with a prompt longer than --max_req_input_len: None rejects it, head drops tokens "
             "from its start, center drops tokens from its middle")
    add("--use_tgi_api", action="store_true",
        help="speak Hugging Face text-generation-inference's request/response format")
    add("--health_monitor", action="store_true", help="probe the server's health and restart it on failure")
    add("--metric_gateway", type=str, default=None, help="Prometheus push gateway (host:port) for metrics")
    add("--job_name", type=str, default="lightllm", help="job name under which metrics are pushed")
    add("--grouping_key", action="append", default=[],
        help="grouping key key=value for pushed metrics (repeatable)")
    add("--push_interval", type=int, default=10, help="seconds between metric pushes")
    add("--enable_monitor_auth", action="store_true",
        help="push metrics with HTTP basic auth (USERNAME and PASSWORD environment variables)")
    # Our addition (vLLM's name): where weights come from; "dummy" fills random weights for benchmarks.
    add("--load_format", type=str, choices=LOAD_FORMATS, default="auto",
        help="jaxllm: weights from HF safetensors (hf), an orbax checkpoint (orbax), whichever the model "
             "directory holds (auto), or random weights on the device for a config-only directory (dummy)")
    add("--api_key", action="append", default=[], metavar="KEY",
        help="jaxllm, not LightLLM (vLLM's name): every route but /health, /healthz, /liveness, /readiness "
             "and /metrics then demands the header `Authorization: Bearer KEY` (401 otherwise); repeat the "
             "flag to accept several keys. Keys are never logged")
    add("--tool_call_parser", type=str, choices=TOOL_CALL_PARSERS, default="auto",
        help="jaxllm (not LightLLM's): the tool-call format the model writes, parsed into OpenAI tool_calls: "
             "hermes (<tool_call> tags: Hermes, Qwen 2.5+), llama3_json (Llama 3.1+ JSON calls), mistral "
             "([TOOL_CALLS]), or auto (guessed from the chat template; hermes when it names none)")
    return p


@dataclasses.dataclass(frozen=True)
class ServerArgs:
    host: str
    port: int
    model_dir: str | None
    tokenizer_mode: str
    load_way: str
    max_total_token_num: int
    batch_max_tokens: int
    eos_id: list[int]
    running_max_req_size: int
    tp: int
    max_req_input_len: int
    max_req_total_len: int
    nccl_port: int
    mode: list[str]
    trust_remote_code: bool
    disable_log_stats: bool
    log_stats_interval: int
    router_token_ratio: float
    router_max_new_token_len: int
    router_max_wait_tokens: int
    use_dynamic_prompt_cache: bool
    splitfuse_block_size: int
    splitfuse_mode: bool
    beam_mode: bool
    diverse_mode: bool
    token_healing_mode: bool
    enable_multimodal: bool
    cache_capacity: int
    cache_reserved_ratio: float
    data_type: str
    return_all_prompt_logprobs: bool
    use_reward_model: bool
    long_truncation_mode: str | None
    use_tgi_api: bool
    health_monitor: bool
    metric_gateway: str | None
    job_name: str
    grouping_key: list[str]
    push_interval: int
    enable_monitor_auth: bool
    load_format: str
    api_key: list[str] = dataclasses.field(repr=False)  # secrets: kept out of reprs and logs
    tool_call_parser: str = "auto"
    multiprocess: bool = False  # --nccl_port given explicitly: one process per --tp device

    @property
    def processes(self) -> int:
        """Processes of the deployment: one per --tp device with --nccl_port given, else one."""
        return self.tp if self.multiprocess else 1

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "ServerArgs":
        """Validate a parsed namespace (LightLLM's start-up checks) and resolve derived defaults.
        Raises ValueError with a one-line reason."""
        values: dict[str, Any] = dict(vars(ns))
        _check_consistency(values)
        values["batch_max_tokens"] = _resolve_batch_max_tokens(values)
        return cls(**values)

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> "ServerArgs":
        """Parse the command line; on a bad or unsupported flag print `jaxllm: ...` and exit with code 2."""
        parser = build_parser()
        ns = parser.parse_args(argv)
        try:
            refuse_unsupported(ns, parser)
            return cls.from_namespace(ns)
        except ValueError as exc:
            print(f"jaxllm: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def parse_args(argv: Sequence[str]) -> ServerArgs:
    """ServerArgs from a list of flags, raising ValueError instead of exiting (tests, offline API)."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    refuse_unsupported(ns, parser)
    return ServerArgs.from_namespace(ns)


def refuse_unsupported(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in UNSUPPORTED_FLAGS:
        if getattr(ns, name) != parser.get_default(name):
            raise ValueError(f"--{name} is not supported yet")


def _check_consistency(v: dict[str, Any]) -> None:
    if not v["max_req_input_len"] < v["max_req_total_len"] <= v["max_total_token_num"]:
        raise ValueError(
            "need --max_req_input_len < --max_req_total_len <= --max_total_token_num "
            f"(got {v['max_req_input_len']}, {v['max_req_total_len']}, {v['max_total_token_num']})"
        )
    modes = [m for m in ("splitfuse_mode", "beam_mode", "diverse_mode", "token_healing_mode") if v[m]]
    if len(modes) > 1:
        raise ValueError(f"at most one of --{', --'.join(modes)} may be set")
    if v["use_dynamic_prompt_cache"] and (v["beam_mode"] or v["token_healing_mode"]):
        raise ValueError("--use_dynamic_prompt_cache cannot be combined with --beam_mode or --token_healing_mode")
    if (v["beam_mode"] or v["diverse_mode"]) and v["router_token_ratio"] != 0.0:
        raise ValueError("--beam_mode and --diverse_mode need --router_token_ratio 0.0")
    if v["load_way"] not in ("HF", "DS"):
        raise ValueError(f"--load_way must be HF or DS, not {v['load_way']!r}")
    for name in ("splitfuse_block_size", "running_max_req_size", "max_total_token_num"):
        if v[name] < 1:
            raise ValueError(f"--{name} must be at least 1")
    if v["router_max_wait_tokens"] < 0:  # 0, as in LightLLM: new requests are tried at every step
        raise ValueError("--router_max_wait_tokens must be at least 0")
    if v["tp"] < 1:
        raise ValueError("--tp must be at least 1")
    if v["cache_capacity"] < 1:
        raise ValueError("--cache_capacity must be at least 1")
    if not 0.0 <= v["cache_reserved_ratio"] <= 1.0:
        raise ValueError("--cache_reserved_ratio must be between 0 and 1")
    if not 0 < v["nccl_port"] < 65536:
        raise ValueError(f"--nccl_port must be a TCP port (1-65535), not {v['nccl_port']}")
    for key in v["grouping_key"]:
        if "=" not in key:
            raise ValueError(f"--grouping_key {key!r} must have the form key=value")
    for i, key in enumerate(v["api_key"]):
        if not key or not all("!" <= c <= "~" for c in key):  # what an HTTP header can carry after "Bearer "
            raise ValueError(f"--api_key number {i + 1} must be printable ASCII without spaces (not shown)")


def _resolve_batch_max_tokens(v: dict[str, Any]) -> int:
    if v["batch_max_tokens"] is None:
        floor = v["splitfuse_block_size"] if v["splitfuse_mode"] else v["max_req_total_len"]
        return max(v["max_total_token_num"] // 6, floor)
    if not v["splitfuse_mode"] and v["batch_max_tokens"] < v["max_req_total_len"]:
        raise ValueError(
            f"--batch_max_tokens ({v['batch_max_tokens']}) must be >= --max_req_total_len ({v['max_req_total_len']})"
        )
    return v["batch_max_tokens"]
