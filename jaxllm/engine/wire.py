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
    """Events gathered over one iteration of the engine loop (add), taken out together (take)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.handles: list[int] = []
        self._token_ids: list[int] = []
        self._texts: list[str] = []
        self._logprobs: list[float] = []
        self._counts: list[int] = []
        self._prompt_tokens: list[int] = []
        self._rare: dict[int, dict] = {}

    def add(self, handle: int, e: TokenEvent) -> None:
        if (e.finished or e.special or e.queue_s is not None or e.cached_tokens is not None
                or e.top_logprobs is not None or e.cumlogprob is not None or e.prompt_logprobs is not None
                or e.score is not None):
            rare = {k: True for k in _FLAGS if getattr(e, k)}
            rare.update((k, v) for k in _OPTIONAL if (v := getattr(e, k)) is not None)
            self._rare[len(self.handles)] = rare
        self.handles.append(handle)
        self._token_ids.append(e.token_id)
        self._texts.append(e.text)
        self._logprobs.append(e.logprob)
        self._counts.append(e.count_output_tokens)
        self._prompt_tokens.append(e.prompt_tokens)

    def take(self) -> tuple:
        """The gathered events as one picklable tuple (see events_of), and a fresh start."""
        taken = (self.handles, self._token_ids, self._texts, self._logprobs, self._counts, self._prompt_tokens,
                 self._rare)
        self._reset()
        return taken


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
