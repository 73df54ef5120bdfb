"""What crosses from the engine core to the frontend per loop iteration, encoded for a cheap pickle: the new
TokenEvents of every request as columns (the frontend's integer handle, token id, text, logprob, counts), with the
fields most events leave unset (finish, specials, first-event extras, logprobs alternatives) sparse by index."""

from __future__ import annotations

from typing import Iterator

from jaxllm.engine.request import TokenEvent

# Set on few events: crossed only where set (flags where true, the others where not None).
_FLAGS = ("special", "finished")
_OPTIONAL = ("finish_reason", "prompt_logprobs", "error", "stop_sequence", "queue_s", "cached_tokens",
             "top_logprobs", "cumlogprob", "score")


class EventColumns:
    """Events gathered over one iteration of the engine loop (add: one append), taken out together as columns
    (take)."""

    def __init__(self) -> None:
        self._pairs: list[tuple[int, TokenEvent]] = []

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, handle: int, event: TokenEvent) -> None:
        self._pairs.append((handle, event))

    def take(self) -> tuple:
        """The gathered events as one picklable tuple of columns (see events_of), and a fresh start."""
        pairs, self._pairs = self._pairs, []
        events = [e for _, e in pairs]
        rare = {}
        for i, e in enumerate(events):
            if (e.finished or e.special or e.queue_s is not None or e.cached_tokens is not None
                    or e.top_logprobs is not None or e.cumlogprob is not None or e.prompt_logprobs is not None
                    or e.score is not None):
                extra = {k: True for k in _FLAGS if getattr(e, k)}
                extra.update((k, v) for k in _OPTIONAL if (v := getattr(e, k)) is not None)
                rare[i] = extra
        return ([h for h, _ in pairs], [e.token_id for e in events], [e.text for e in events],
                [e.logprob for e in events], [e.count_output_tokens for e in events],
                [e.prompt_tokens for e in events], rare)


def events_of(columns: tuple) -> Iterator[tuple[int, TokenEvent]]:
    """(handle, event) of every event in `columns` (EventColumns.take), in order."""
    handles, token_ids, texts, logprobs, counts, prompt_tokens, rare = columns
    for i, handle in enumerate(handles):
        event = TokenEvent(token_ids[i], texts[i], logprobs[i], False, counts[i], prompt_tokens[i], False, None)
        extra = rare.get(i)
        if extra is not None:
            for name, value in extra.items():
                setattr(event, name, value)
        yield handle, event
