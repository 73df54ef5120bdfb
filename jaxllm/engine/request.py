"""A request's whole state (ids, sampling parameters, KV slots, output) and the events its stream yields.

`SamplingParams` carries LightLLM's parameter names and defaults; `Request` is the one object the scheduler,
KV cache, runner and engine loop share; `TokenEvent` is what a consumer receives per generated token.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A temperature below this is greedy decoding (LightLLM's rule).
_GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # the most alternatives a generated position reports (OpenAI's chat limit)
MAX_LOGIT_BIAS = 1024  # the most token ids one request's logit_bias may name


GUIDED_KINDS = ("json_schema", "json_object", "regex", "choice", "lark")


@dataclass(frozen=True)
class Guided:
    """A constraint on the generated text (ours: not LightLLM's). kind: one of GUIDED_KINDS; value: the JSON
    schema as JSON text, the regular expression, the choices as a JSON list of strings, the Lark grammar
    ("" for json_object). field: the request field it came from, named in errors."""

    kind: str
    value: str = ""
    field: str = "guided"


@dataclass(frozen=True)
class SamplingParams:
    """LightLLM's generation parameters (same names and defaults), plus `seed` and `prompt_logprobs`."""

    best_of: int = 1
    n: int = 1
    do_sample: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    exponential_decay_length_penalty: tuple[int, float] = (1, 1.0)  # (start index, factor)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    ignore_eos: bool = False
    max_new_tokens: int = 16
    min_new_tokens: int = 1
    stop_sequences: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    add_spaces_between_special_tokens: bool = True
    print_eos_token: bool = False
    input_penalty: bool = False  # count the prompt's tokens in the penalties too
    seed: int | None = None  # ours: a reproducible sample stream (OpenAI / TGI `seed`), taken modulo 2**64
    prompt_logprobs: bool = False  # ours: logprob of every prompt token given its prefix
    top_logprobs: int = 0  # ours: the k most likely tokens' logprobs at each generated position (k <= 20)
    guided: Guided | None = None  # ours: the grammar the output must follow (constrained decoding)
    typical_p: float = 1.0  # ours (TGI's): locally typical sampling's mass, after top-p and top-k; 1 = off
    # ours (OpenAI's): (token id, bias) pairs added to the logits before sampling, ids ascending; a dict is taken
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        # Accept lists and a lone string where tuples are declared (JSON bodies give lists).
        stops = self.stop_sequences
        if stops is None:
            stops = ()
        elif isinstance(stops, str):
            stops = (stops,)
        object.__setattr__(self, "stop_sequences", tuple(stops))
        decay = self.exponential_decay_length_penalty
        if isinstance(decay, list):
            object.__setattr__(self, "exponential_decay_length_penalty", tuple(decay))
        bias = self.logit_bias
        pairs = tuple((k, v) for k, v in (bias.items() if isinstance(bias, dict) else bias or ()))
        try:
            pairs = tuple(sorted(pairs))
        except TypeError:  # ids of mixed types: validate() names the field
            pass
        object.__setattr__(self, "logit_bias", pairs)

    def normalized(self) -> "SamplingParams":
        """do_sample False, or a temperature in [0, 1e-5), means greedy: temperature 1, top_p 1, top_k 1."""
        greedy = not self.do_sample or 0 <= self.temperature < _GREEDY_TEMPERATURE
        if not greedy:
            return self
        return dataclasses.replace(self, do_sample=False, temperature=1.0, top_p=1.0, top_k=1, typical_p=1.0)

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (after normalisation: always the most likely token)."""
        return self.normalized().top_k == 1

    def validate(self) -> None:
        """Raise ValueError("<field>: reason") for the first value outside LightLLM's accepted ranges."""
        checks = [
            ("best_of", 1 <= self.best_of <= 8, "must be between 1 and 8"),
            ("n", self.n == self.best_of, "must equal best_of"),
            ("presence_penalty", self.presence_penalty >= 0.0, "must be >= 0"),
            ("frequency_penalty", self.frequency_penalty >= 0.0, "must be >= 0"),
            ("repetition_penalty", self.repetition_penalty >= 1.0, "must be >= 1.0"),
            ("temperature", self.temperature > 0.0, "must be > 0 (or do_sample false for greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("typical_p", 0.0 < self.typical_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 1, "must be -1 (no limit) or >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("min_new_tokens", 1 <= self.min_new_tokens <= self.max_new_tokens,
             "must be between 1 and max_new_tokens"),
            ("exponential_decay_length_penalty", _valid_decay(self.exponential_decay_length_penalty),
             "must be a pair [start index >= 0, factor >= 1.0]"),
            ("stop_sequences", all(isinstance(s, str) and s for s in self.stop_sequences),
             "must be non-empty strings"),
            ("guided", self.guided is None or (isinstance(self.guided, Guided) and self.guided.kind in GUIDED_KINDS),
             f"must be one of {', '.join(GUIDED_KINDS)}"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
             "must be an integer"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"must be between 0 and {MAX_TOP_LOGPROBS}"),
            ("logit_bias", _valid_bias(self.logit_bias),
             f"must map at most {MAX_LOGIT_BIAS} distinct token ids (integers >= 0) to biases in [-100, 100]"),
        ]
        for name, ok, reason in checks:
            if not ok:
                raise ValueError(f"{name}: {reason} (got {getattr(self, name)!r})")


# What a reward model's request runs with: its prompt's one step, whose result is a score, not a token.
SCORE_PARAMS = SamplingParams(max_new_tokens=1).normalized()


def _valid_bias(pairs: tuple) -> bool:
    ids = [k for k, _ in pairs]
    return (len(pairs) <= MAX_LOGIT_BIAS and len(set(ids)) == len(ids)
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in ids)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100 for _, v in pairs))


def _valid_decay(value: Any) -> bool:
    if not isinstance(value, tuple) or len(value) != 2:
        return False
    start, factor = value
    return isinstance(start, int) and not isinstance(start, bool) and start >= 0 and float(factor) >= 1.0


@dataclass(slots=True)
class TokenEvent:
    """One generated token, in order. An abort or error that comes with no token has token_id -1."""

    token_id: int
    text: str  # new text: "" for held-back text (incomplete UTF-8, a possible stop string), specials, eos
    # (None only between the engine core and the frontend, which makes that event's text: EventMaker.text_elsewhere)
    logprob: float
    special: bool
    count_output_tokens: int
    prompt_tokens: int
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_logprobs: list | None = None  # first event only: [[token_id, {"<next_id>": logprob}], ...]
    error: str | None = None
    stop_sequence: str | None = None  # the stop string the text ends with, when one ended the request
    queue_s: float | None = None  # first event only: seconds from submit to first scheduled
    cached_tokens: int | None = None  # first event only, with the prompt cache on: prompt tokens found cached
    top_logprobs: list[tuple[int, float]] | None = None  # params.top_logprobs most likely (id, logprob), best first
    cumlogprob: float | None = None  # sum of the sequence's logprobs so far (--diverse_mode, --beam_mode details)
    score: list[float] | None = None  # a reward model's request: the score head's outputs at its last token
    # first event only, with prompt_logprobs and top_logprobs: each prompt_logprobs entry's top_logprobs most likely
    # next tokens, [[(id, logprob), ...], ...] best first
    prompt_top_logprobs: list | None = None


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, never run
    RUNNING = "running"  # holds KV and a table row
    PAUSED = "paused"  # preempted: KV returned, back in the queue, recomputed when readmitted
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageSpan:
    """An image in a prompt: its embeddings replace positions start..start + image.num_tokens
    (`image`: a `jaxllm.models.vision.interface.ImageInput`); `placeholder_id`: the token the caller's prompt
    had there (what the tokenizer and the model see at those positions)."""

    start: int
    image: Any
    placeholder_id: int

    @property
    def stop(self) -> int:
        return self.start + self.image.num_tokens


@dataclass(eq=False)
class Request:
    """A request's state. Positions 0..num_tokens: the prompt, then the outputs; the last `num_pending`
    outputs were sampled on the device and are not read yet. `num_computed` positions have their KV
    written (or written by a dispatched step), in `slots[0:num_computed]`; the first `num_cached` of those
    slots belong to the prompt cache (locked through `cache_node` while the request runs), the rest to the
    request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # params.seed, or one drawn at submit: every request samples from its own stream
    arrival: int  # submission order: the youngest has the largest
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_pending: int = 0
    num_computed: int = 0
    slots: list[int] = field(default_factory=list)
    kv_row: int = -1  # row of the device slot table, while RUNNING
    num_cached: int = 0  # leading slots owned by the prompt cache (see KVCache)
    cache_node: Any = None  # the prompt cache's lock handle covering slots[:num_cached]
    submitted_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # first admission (time.monotonic)
    cache_hit: int | None = None  # prompt tokens found in the prompt cache at first admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    prompt_logprobs: list | None = None  # filled by the first prefill when params.prompt_logprobs
    prompt_top_logprobs: list | None = None  # with them, when params.top_logprobs too (EventMaker.add_prompt_logprobs)
    stream: Any = None  # where TokenEvents go (engine.RequestStream)
    token_text: Any = None  # TokenText, when the engine makes its text (has a tokenizer, no frontend doing it)
    # Its events carry only a token, its logprob and counts (text made by the frontend; no stops, constraint,
    # alternatives or sums): the engine core's fast path (EventMaker.attach sets it).
    events_plain: bool = False
    stop_matcher: Any = None  # StopMatcher, when params.stop_sequences
    group: Any = None  # the SequenceGroup of best_of > 1 sequences sharing this prompt (group.py)
    constraint: Any = None  # the allowed-token rule of its next tokens (engine.constraints.TokenConstraint)
    healing: Any = None  # its HealingConstraint under --token_healing_mode (prompt_ids is then the backed-up prompt)
    images: tuple[ImageSpan, ...] = ()  # its prompt's images, in order (their positions hold image key ids)
    image_entries: list = field(default_factory=list)  # the image cache entries it holds, as `images`

    @property
    def text_prompt_ids(self) -> list[int]:
        """The prompt as the tokenizer knows it: image positions hold their placeholder's id, not the image key."""
        if not self.images:
            return self.prompt_ids
        ids = list(self.prompt_ids)
        for span in self.images:
            ids[span.start : span.stop] = [span.placeholder_id] * (span.stop - span.start)
        return ids

    def image_rows(self, start: int, stop: int):
        """[stop - start] int32 image-embedding rows of positions start..stop (-1 where no image), or None
        when no image lies there."""
        spans = [(s, e) for s, e in zip(self.images, self.image_entries) if s.start < stop and s.stop > start]
        if not spans:
            return None
        rows = np.full(stop - start, -1, np.int32)
        for span, entry in spans:
            lo, hi = max(start, span.start), min(stop, span.stop)
            rows[lo - start : hi - start] = entry.rows[lo - span.start : hi - span.start]
        return rows

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        """Output tokens sampled so far, read or not."""
        return len(self.output_ids) + self.num_pending

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + self.num_output

    @property
    def num_known(self) -> int:
        """Tokens whose ids the host has."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Host-known ids of positions start..stop."""
        p = len(self.prompt_ids)
        if stop <= p:
            return self.prompt_ids[start:stop]
        if start >= p:
            return self.output_ids[start - p : stop - p]
        return self.prompt_ids[start:] + self.output_ids[: stop - p]

    @property
    def remaining(self) -> int:
        """Positions whose KV is still to compute (the last sampled token's included)."""
        return self.num_tokens - self.num_computed

    @property
    def decoding(self) -> bool:
        """Past its prefill: only the last sampled token is left to compute (num_output > 0 and remaining == 1,
        computed inline: read for every running request at every step)."""
        outputs = len(self.output_ids) + self.num_pending
        return outputs > 0 and len(self.prompt_ids) + outputs - self.num_computed == 1

    @property
    def wants_token(self) -> bool:
        """Still short of max_new_tokens counting the tokens in flight (an eos may end it sooner)."""
        within_prompt = 0 if self.healing is None else self.healing.tokens_within_prompt
        return len(self.output_ids) + self.num_pending - within_prompt < self.params.max_new_tokens

    @property
    def outputs_within_prompt(self) -> int:
        """Token healing: read outputs that only re-cover the caller's prompt (max_new_tokens does not count
        them)."""
        return 0 if self.healing is None else self.healing.tokens_within_prompt

    @property
    def caller_prompt_len(self) -> int:
        """The prompt's length as the caller sent it (token healing runs it backed up)."""
        return len(self.prompt_ids) + (0 if self.healing is None else self.healing.backed_up)

    @property
    def count_output(self) -> int:
        """Read output tokens beyond the caller's prompt."""
        return len(self.output_ids) - self.outputs_within_prompt

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def shared_prefix(self) -> int:
        """Leading positions whose KV another sequence of its group holds too (counted once, by the leader)."""
        return self.group.shared_prefix(self) if self.group is not None else 0

    @property
    def awaits_fork(self) -> bool:
        """A group member admitted with its group, waiting for the leader's prefill to share the prompt."""
        return self.group is not None and not self.slots and self.group.leader is not self

    @property
    def top_logprobs_wanted(self) -> int:
        """How many most likely tokens its sampled positions report (its own ask, or its beam search's)."""
        return max(self.params.top_logprobs, self.group.top_logprobs if self.group is not None else 0)

    @property
    def awaits_host(self) -> bool:
        """Its next token is chosen on the host from the last step's results (beam search): not schedulable
        while a step's results are unread."""
        return self.group is not None and self.group.beam is not None and self.num_pending > 0
