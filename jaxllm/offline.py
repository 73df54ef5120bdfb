"""Offline batch generation in Python on the serving engine: `LLM(model_dir, **flags).generate(prompts, params)`,
or, for a reward model (use_reward_model=True), `LLM(...).score(prompts)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tqdm import tqdm

from jaxllm.args import ExplicitFlag, ServerArgs, build_parser, refuse_unsupported
from jaxllm.engine.engine import Engine
from jaxllm.engine.request import SamplingParams
from jaxllm.metrics import StatsLogger


@dataclasses.dataclass
class GenerationOutput:
    """One prompt's result."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[float]  # of each generated token
    prompt_logprobs: list | None = None  # with SamplingParams(prompt_logprobs=True)


def server_args(model_dir: str, **flags) -> ServerArgs:
    """ServerArgs as `python -m jaxllm.serve --model_dir DIR --flag value ...` would give, flags given as
    keyword arguments with the CLI's names and typed values (e.g. data_type="float32", eos_id=[2])."""
    parser = build_parser()
    ns = parser.parse_args(["--model_dir", str(model_dir)])
    for name, value in flags.items():
        if not hasattr(ns, name):
            raise TypeError(f"unknown flag {name!r} (python -m jaxllm.serve --help lists them)")
        action = parser._option_string_actions[f"--{name}"]  # noqa: SLF001 - argparse has no public getter
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"--{name} {value!r} is not one of {', '.join(map(str, action.choices))}")
        if isinstance(action, ExplicitFlag):
            action(parser, ns, value)  # given, as on the command line
        else:
            setattr(ns, name, value)
    refuse_unsupported(ns, parser)
    return ServerArgs.from_namespace(ns)


class LLM:
    """The in-process engine for batch generation; flags are `python -m jaxllm.serve`'s, by keyword."""

    def __init__(self, model_dir: str, *, warmup: int | None = None, **flags):
        self.args = server_args(model_dir, **flags)
        self.engine = Engine.from_args(self.args, warmup=warmup)
        self.tokenizer = self.engine.tokenizer
        self.engine.start()
        self._stats_log = StatsLogger.from_args(self.args, self.engine.stats)
        if self._stats_log is not None:
            self._stats_log.start()

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[GenerationOutput]:
        """One GenerationOutput per prompt, in order. Prompts are strings (tokenised as the server does) or
        token-id lists; `params` is one SamplingParams for all or one per prompt."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for p in params:
            if p.best_of != 1:
                raise ValueError("best_of/n: generate() returns one sequence per prompt; repeat the prompt instead")
        ids = [self._token_ids(p) for p in prompts]
        streams = self.engine.submit_many([(i, p, None) for i, p in zip(ids, params)])
        outputs = []
        with tqdm(total=len(streams), desc="generating", unit="req", disable=not use_tqdm) as bar:
            for prompt_ids, stream in zip(ids, streams):
                outputs.append(_collect(prompt_ids, stream))
                bar.update(1)
        return outputs

    def score(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, use_tqdm: bool = True) -> list[list[float]]:
        """A reward model's scores of each prompt (the score head's outputs at its last token), in order;
        prompts are strings or token-id lists, batched by the engine as /get_score's are."""
        ids = [self._token_ids(p) for p in prompts]
        streams = [self.engine.submit_score(i) for i in ids]
        scores = []
        for stream in tqdm(streams, desc="scoring", unit="req", disable=not use_tqdm):
            (event,) = list(stream)
            if event.score is None:
                raise RuntimeError(f"request {stream.request_id} ended with {event.finish_reason}: {event.error}")
            scores.append(event.score)
        return scores

    def _token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.args.model_dir} has no tokenizer: give prompts as token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def close(self) -> None:
        if self._stats_log is not None:
            self._stats_log.stop()
        self.engine.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _collect(prompt_ids: list[int], stream) -> GenerationOutput:
    tokens, logprobs, texts, prompt_logprobs = [], [], [], None
    for event in stream:
        if event.finish_reason in ("error", "abort"):
            raise RuntimeError(f"request {stream.request_id} ended with {event.finish_reason}: {event.error}")
        tokens.append(event.token_id)
        logprobs.append(event.logprob)
        texts.append(event.text)
        if event.prompt_logprobs is not None:
            prompt_logprobs = event.prompt_logprobs
        finish_reason = event.finish_reason
    return GenerationOutput(prompt_ids, tokens, "".join(texts), finish_reason, logprobs, prompt_logprobs)
