"""The static key a compiled step is specialised on (StepShape) and the power-of-two buckets its sizes come from."""

from __future__ import annotations

import dataclasses


def pow2_buckets(max_value: int, minimum: int = 1) -> list[int]:
    """minimum, 2·minimum, … up to the first power of two ≥ max_value."""
    buckets = [minimum]
    while buckets[-1] < max_value:
        buckets.append(buckets[-1] * 2)
    return buckets


def pick_bucket(buckets: list[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What a compiled step is specialised on: bucket sizes and the static switches."""

    tokens: int
    rows: int
    width: int
    decode_only: bool
    all_logits: bool = False  # some row wants prompt logprobs
    penalties: bool = False  # some row has a repetition / frequency / presence penalty
    sampling: bool = False  # some row is not greedy
    top_logprobs: bool = False  # some row reports its most likely tokens' logprobs (MAX_TOP_LOGPROBS of them)
    constrained: bool = False  # some sampled row has an allowed-token mask: the sampler runs as a second call
    typical: bool = False  # some row's draw takes a typical_p cut
    bias: int = 0  # logit_bias columns per row (RowValues.bias_width; 0: no row has one)

    def static_args(self) -> dict:
        """The step function's static arguments (sizes come with the arrays)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("tokens", "rows", "constrained", "bias")}

    def compiled_as(self) -> StepShape:
        """The shape whose compiled step runs this one: a constrained step runs the greedy step of its sizes
        (its sampler comes after, with the masks)."""
        if not self.constrained:
            return self
        return dataclasses.replace(self, penalties=False, sampling=False, top_logprobs=False, constrained=False,
                                   typical=False)
