"""What crosses from the engine core to the frontend per loop iteration, encoded for a cheap pickle: the new
TokenEvents of every request as columns (the frontend's integer handle, token id, text, logprob, counts), with the
fields most events leave unset (finish, specials, first-event extras, logprobs alternatives) sparse by index."""

from __future__ import annotations

from typing import Iterator

from jaxllm.engine.request import TokenEvent

# Set on few events: crossed only where set (flags where true, the others where not None).
_FLAGS = ("special", "finished")
_OPTIONAL = ("finish_reason", "prompt_logprobs", "error", "stop_sequence", "queue_s", "cached_tokens",
             "top_logprobs", "cumlogprob", "score", "prompt_top_logprobs")


class EventColumns:
    """Events gathered over one iteration of the engine loop, as columns (add: one event; add_plain: many plain
    ones at once), taken out together (take)."""

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        # handle, token id, text, logprob, output count, prompt tokens; and the rare fields by event index
        self._columns: tuple[list, ...] = ([], [], [], [], [], [])
        self._rare: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self._columns[0])

    def add(self, handle: int, event: TokenEvent) -> None:
        handles, token_ids, texts, logprobs, counts, prompt_tokens = self._columns
        e = event
        if (e.finished or e.special or e.queue_s is not None or e.cached_tokens is not None
                or e.top_logprobs is not None or e.cumlogprob is not None or e.prompt_logprobs is not None
                or e.score is not None):
            extra = {k: True for k in _FLAGS if getattr(e, k)}
            extra.update((k, v) for k in _OPTIONAL if (v := getattr(e, k)) is not None)
            self._rare[len(handles)] = extra
        handles.append(handle)
        token_ids.append(e.token_id)
        texts.append(e.text)
        logprobs.append(e.logprob)
        counts.append(e.count_output_tokens)
        prompt_tokens.append(e.prompt_tokens)

    def add_plain(self, handles: list[int], token_ids: list[int], logprobs: list[float], counts: list[int],
                  prompt_tokens: list[int]) -> None:
        """Events that set nothing rare and whose text the frontend makes (text None), one per entry."""
        columns = self._columns
        columns[0].extend(handles)
        columns[1].extend(token_ids)
        columns[2].extend([None] * len(handles))
        columns[3].extend(logprobs)
        columns[4].extend(counts)
        columns[5].extend(prompt_tokens)

    def take(self) -> tuple:
        """The gathered events as one picklable tuple of columns (see events_of), and a fresh start."""
        taken = (*self._columns, self._rare)
        self._start()
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
