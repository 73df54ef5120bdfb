"""What the flags build before the engine loop starts: the model, its weights on the --tp mesh and the tokenizer
(`load_model`), the scheduling policy (`build_scheduler`) and the runner over them (`build_runner`). Every process
of a multi-process deployment builds the same model and runner from the same flags."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import jax

from jaxllm import xla_options
from jaxllm.config import ModelConfig, read_hf_config
from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.runner import ModelRunner
from jaxllm.engine.scheduler import Scheduler, SchedulerConfig
from jaxllm.engine.splitfuse import SplitFuseScheduler
from jaxllm.engine.startup import log_weights, phase
from jaxllm.models import build_model
from jaxllm.models.backends import attention_backend, resolve_modes
from jaxllm.models.expert_kernels import experts_kernel
from jaxllm.models.quant import with_weight_mode
from jaxllm.models.registry import SCORE_ARCHITECTURES
from jaxllm.models.vision.registry import vision_family
from jaxllm.parallel import kv_cache_spec, make_mesh, with_expert_placement
from jaxllm.thread_names import name_os_thread
from jaxllm.weights import DATA_TYPES, load_params



@dataclasses.dataclass
class LoadedModel:
    """A built model, its weights on `mesh` (or a Future of them, still loading), and the model directory's
    tokenizer (None without one)."""

    model: object
    params: object
    mesh: object
    tokenizer: object | None


def check_reward_flags(config: ModelConfig, args) -> None:
    """--use_reward_model and a checkpoint with a score head go together, without --token_healing_mode (which
    rewrites prompts for generation); ValueError otherwise."""
    if args.use_reward_model and config.score_head is None:
        raise ValueError(f"--use_reward_model: {args.model_dir} is not a reward model (config.json's architectures "
                         f"name no score head; served: {', '.join(SCORE_ARCHITECTURES)})")
    if config.score_head is not None and not args.use_reward_model:
        raise ValueError(f"{args.model_dir} is a reward model (a score head, no LM head): serve it with "
                         "--use_reward_model")
    if config.score_head is not None and args.token_healing_mode:
        raise ValueError("--token_healing_mode: a reward model generates no tokens to heal")


def build_scheduler(args, kv: KVCache) -> Scheduler:
    """The policy the flags ask for: LightLLM's router, or its splitfuse variant."""
    policy = SplitFuseScheduler if args.splitfuse_mode else Scheduler
    return policy(SchedulerConfig.from_args(args), kv)


def build_runner(args, model, params, mesh, kv: KVCache, max_step_tokens: int, peers=None,
                 image_rows: int = 0) -> ModelRunner:
    """The runner of `model` over the host KV accounting `kv`, for steps of up to `max_step_tokens` tokens
    (`peers`: process 0's followers in a multi-process deployment; `image_rows`: the image-embedding buffer's
    rows, for a vision-language model under --enable_multimodal)."""
    return ModelRunner(
        model, params, mesh, kv_cache_spec(model.config, args.tp), kv,
        max_len=args.max_req_total_len, max_prefill_tokens=max_step_tokens, eos_ids=tuple(args.eos_id), peers=peers,
        image_rows=image_rows, mixed_steps=args.splitfuse_mode,
    )


def image_processor(args, config: ModelConfig):
    """The image processor of a vision-language model served with --enable_multimodal, else None."""
    if config.vision is None or not args.enable_multimodal:
        return None
    return vision_family(config.vision.family).processor(config, args.model_dir)


def image_buffer(args, config: ModelConfig):
    """(the image processor, the image-embedding buffer's rows) of a vision-language model served with
    --enable_multimodal; (None, 0) otherwise. The rows hold --cache_capacity images of the processor's most
    tokens, but never more than the KV cache's tokens (at least one request's worth): the images running
    requests use sit in the KV cache too, and a processor of dynamic resolution (Qwen2-VL: up to 16,384 tokens
    an image) would otherwise ask for a buffer of tens of GB. Entries take the rows of their own token count."""
    processor = image_processor(args, config)
    if processor is None:
        return None, 0
    most = max(args.max_total_token_num, args.max_req_total_len, processor.max_tokens)
    return processor, min(args.cache_capacity * processor.max_tokens, most)


def load_model(args, devices=None, *, tokenizer: bool = True, weights_behind: bool = False) -> LoadedModel:
    """Load config, tokenizer (unless not wanted) and weights from args.model_dir onto a --tp mesh over
    `devices` (by default jax.devices()). `weights_behind`: the weights load in a thread of their own (the
    tokenizer loads, and the caller may compile the steps, meanwhile); `params` is then a Future."""
    if args.model_dir is None:
        raise ValueError("--model_dir is required")
    with phase("config"):  # and the devices' start (the first jax.devices())
        config = ModelConfig.from_model_dir(args.model_dir, trust_remote_code=args.trust_remote_code)
        config.check_context(args.max_req_total_len)
        check_reward_flags(config, args)
        config = with_weight_mode(config, resolve_modes(args.mode).weight_mode, read_hf_config(args.model_dir))
        config = with_expert_placement(config)
        xla_options.for_weights(config.weight_quant)  # before the backend starts (below, unless it has)
        mesh = make_mesh(args.tp, devices)
        platform = jax.devices()[0].platform
        backend = attention_backend(args.mode, platform, mesh=mesh)
        placement = config.moe.placement if config.moe is not None else "split"
        model = build_model(config, DATA_TYPES[args.data_type], backend, experts_kernel(platform, mesh, placement))
    if weights_behind:
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-load", initializer=name_os_thread)
        params = thread.submit(_load_weights, model, args, mesh)
        thread.shutdown(wait=False)  # its thread ends with the load
    else:
        params = _load_weights(model, args, mesh)
    loaded = LoadedModel(model, params, mesh, None)
    if tokenizer:
        with phase("tokenizer"):
            from jaxllm.engine.detokenizer import model_tokenizer  # transformers: not imported by the followers
            loaded.tokenizer = model_tokenizer(args)
    return loaded


def _load_weights(model, args, mesh):
    with phase(f"weights-{args.load_format}") as timer:
        params = load_params(model, args.model_dir, mesh, args.tp, args.load_format, load_way=args.load_way)
        jax.block_until_ready(params)
    log_weights(params, timer.seconds)
    return params
