"""What a request's consumer receives: each sampled token as a TokenEvent (text, eos and stop checks, the first
event's extras), the prompt logprobs gathered per position, a reward model's score, and the final event of a
request ended early."""

from __future__ import annotations

import numpy as np

from jaxllm.engine.detokenizer import StopMatcher, special_ids
from jaxllm.engine.request import Request, TokenEvent
from jaxllm.engine.token_text import TokenText, text_needed_in_engine


class EventMaker:
    """Turns a request's sampled tokens into its TokenEvents, per LightLLM's text rules."""

    def __init__(self, tokenizer, eos_ids, *, prompt_cache: bool = False, cumlogprob: bool = False,
                 text_elsewhere: bool = False):
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_ids)
        self.special = special_ids(tokenizer)
        self._notable = np.array(sorted(self.eos | self.special), np.int64)  # tokens a plain event never has
        # Behind the HTTP frontend, which makes the text of the rows whose text the engine does not need: their
        # events leave with text None.
        self.text_elsewhere = text_elsewhere and tokenizer is not None
        self.prompt_cache = prompt_cache  # first events report the prompt tokens found cached
        self.cumlogprob = cumlogprob  # events carry the sum of the sequence's logprobs (LightLLM's group modes)

    def attach(self, req: Request) -> None:
        """Give a request fresh text state (its TokenText, a stop matcher) and an empty output: when new, and
        when a beam search hands it its final tokens."""
        req.output_ids, req.output_logprobs = [], []
        p = req.params
        if self.tokenizer is not None and not (self.text_elsewhere and not text_needed_in_engine(req)):
            req.token_text = TokenText(self.tokenizer, req.text_prompt_ids, p, self.eos, self.special)
            if p.stop_sequences:
                req.stop_matcher = StopMatcher(p.stop_sequences)
        # (No constraint: no token healing either, so its output count is its number of outputs.)
        req.events_plain = (self.text_elsewhere and req.token_text is None and req.constraint is None
                            and not p.top_logprobs and not self.cumlogprob)

    def plain_tokens(self, reqs: list[Request], sampled: np.ndarray, logprobs: np.ndarray):
        """The engine core's fast path through a decode step's rows (`reqs`, row i sampled `sampled[i]` with
        `logprobs[i]`): append the token of each request whose event is plain — `req.events_plain`, not in a
        group, neither its first nor its last token, no eos or special token — and return (for every row whether
        it was taken, then the taken rows' events as columns: token ids, logprobs, output counts, prompt tokens).
        `token` makes the other rows' events."""
        notable = np.isin(sampled, self._notable).tolist()
        ids, lps = sampled.tolist(), logprobs.tolist()
        taken = [False] * len(reqs)
        token_ids, token_lps, counts, prompt_tokens = [], [], [], []
        for i, req in enumerate(reqs):
            outputs = req.output_ids
            if (req.events_plain and not notable[i] and 0 < len(outputs) < req.params.max_new_tokens - 1
                    and req.group is None and not req.finished):
                outputs.append(ids[i])
                req.output_logprobs.append(lps[i])
                taken[i] = True
                token_ids.append(ids[i])
                token_lps.append(lps[i])
                counts.append(len(outputs))
                prompt_tokens.append(req.caller_prompt_len)
        return taken, token_ids, token_lps, counts, prompt_tokens

    def token(self, req: Request, token: int, logprob: float, top: list[tuple[int, float]] | None = None,
              advanced: bool = False) -> TokenEvent:
        """Append `token` to req's output and make its event; event.finished says whether req is done. Its text
        follows TokenText's rules (None when the frontend makes it: `text_elsewhere`).
        `top`: the most likely tokens at this position, (id, logprob) best first, when req asked for them;
        `advanced`: req's constraint has already taken the token."""
        params = req.params
        outputs = req.output_ids
        outputs.append(token)
        req.output_logprobs.append(logprob)
        constraint = req.constraint
        if constraint is not None and constraint.active and not advanced:
            constraint.advance(token)
        count = req.count_output
        reason = None
        if token in self.eos and not params.ignore_eos:
            reason = "stop"
        elif constraint is not None and constraint.complete:  # the grammar allows nothing more
            reason = "stop"
        elif count >= params.max_new_tokens:
            reason = "length"
        text = None if self.text_elsewhere else ""
        if req.token_text is not None:
            text = req.token_text.add(token)
            if req.healing is not None:
                text = req.healing.skip_prompt_text(text)
        stop_sequence = None
        if req.stop_matcher is not None:
            text, stopped = req.stop_matcher.feed(text)
            if stopped:
                reason = "stop"
                stop_sequence = next((s for s in params.stop_sequences if text.endswith(s)), None)
            elif reason is not None:
                text += req.stop_matcher.flush()
        # Positional: a dataclass's keyword call costs twice as much, and this runs for every row of every step.
        event = TokenEvent(token, text, logprob, token in self.special, count, req.caller_prompt_len,
                           reason is not None, reason)
        if stop_sequence is not None:
            event.stop_sequence = stop_sequence
        if top is not None and params.top_logprobs:
            event.top_logprobs = top[: params.top_logprobs]
        if self.cumlogprob:
            event.cumlogprob = float(np.sum(req.output_logprobs))
        if len(outputs) == 1:
            if params.prompt_logprobs:  # a group's are computed by its leader, for every member
                members = req.group.members if req.group is not None else [req]
                leader = next((m for m in [req, *members] if m.prompt_logprobs), None)
                if leader is not None:
                    event.prompt_logprobs = leader.prompt_logprobs
                    event.prompt_top_logprobs = leader.prompt_top_logprobs
            self._first_event_extras(req, event)
        return event

    def _first_event_extras(self, req: Request, event: TokenEvent) -> None:
        """Queue time, and the prompt tokens found cached when the prompt cache is on."""
        if req.scheduled_at is not None:
            event.queue_s = req.scheduled_at - req.submitted_at
        if self.prompt_cache:
            event.cached_tokens = req.cache_hit or 0

    def score(self, req: Request, score: list[float]) -> TokenEvent:
        """The one event of a reward model's request: its score (no token), finish_reason "stop", and the first
        event's extras."""
        event = final_event(req, "stop")
        event.score = score
        self._first_event_extras(req, event)
        return event

    @staticmethod
    def add_prompt_logprobs(req: Request, start: int, count: int, logprobs: np.ndarray, top_ids=None,
                            top_logprobs=None) -> None:
        """[[token_id, {"<next_id>": logprob}], ...] for prompt positions start.. (all but the last); positions
        already there (a prefill recomputed after a preemption) are kept. With `top_ids` / `top_logprobs` [count,
        K] (a request with top_logprobs), each position's params.top_logprobs most likely next tokens too, as
        [(id, logprob), ...] best first (req.prompt_top_logprobs, entry for entry)."""
        entries = req.prompt_logprobs if req.prompt_logprobs is not None else []
        tops = req.prompt_top_logprobs if req.prompt_top_logprobs is not None else []
        k = req.params.top_logprobs if top_ids is not None else 0
        prompt = req.prompt_ids
        for j, pos in enumerate(range(start, min(start + count, len(prompt) - 1))):
            if pos == len(entries):
                entries.append([prompt[pos], {str(prompt[pos + 1]): float(logprobs[j])}])
            if k and pos == len(tops):
                tops.append(list(zip(top_ids[j, :k].tolist(), top_logprobs[j, :k].tolist())))
        req.prompt_logprobs = entries
        if k:
            req.prompt_top_logprobs = tops


def final_event(req: Request, reason: str, error: str | None = None) -> TokenEvent:
    """The last event of a request that ends without a token (abort, error, shutdown)."""
    return TokenEvent(
        token_id=-1, text="", logprob=0.0, special=False, count_output_tokens=req.count_output,
        prompt_tokens=req.caller_prompt_len, finished=True, finish_reason=reason, error=error,
    )
