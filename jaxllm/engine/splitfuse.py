"""--splitfuse_mode: every step decodes one token of every running request past its prefill and packs up to
`--splitfuse_block_size` prompt tokens beside them (chunks of running prefills, then of newly admitted
requests), so that a long prompt is prefilled over several steps and never stalls the running streams.
"""

from __future__ import annotations

from jaxllm.engine.request import Request, RequestStatus
from jaxllm.engine.scheduler import Scheduler, SchedulerOutput


class SplitFuseScheduler(Scheduler):
    """The router's admission estimates and preemption, with mixed steps instead of separate prefill and decode
    steps. A request's prefill advances by chunks: each chunk's KV is written before the next chunk reads
    it (the prefill-over-prefix attention), and only the chunk that completes it samples a token."""

    def __init__(self, config, kv):
        if config.splitfuse_block_size < 1:
            raise ValueError(f"--splitfuse_block_size must be at least 1 (got {config.splitfuse_block_size})")
        super().__init__(config, kv)

    @property
    def block_size(self) -> int:
        """Prompt tokens per step (LightLLM's splitfuse queue caps a step at the block; --batch_max_tokens,
        when set lower, caps it too)."""
        return min(self.config.splitfuse_block_size, self.config.batch_max_tokens)

    @property
    def max_step_tokens(self) -> int:
        return self.block_size + self.config.running_max_req_size

    def schedule(self) -> SchedulerOutput:
        preempted: list[Request] = []
        while True:
            decoding = self._decodable()
            victims = self._make_room(decoding)
            if victims:
                preempted += victims
                decoding = [r for r in decoding if r.status is RequestStatus.RUNNING]
            chunks = self._decode(decoding)
            chunks += self._continue_prefills(self.block_size)
            chunks += self._admit(self.block_size - sum(c.num_tokens for c in chunks if not c.decode), chunked=True)
            if chunks or not self._stalled():
                kind = "prefill" if any(not c.decode for c in chunks) else ("decode" if chunks else "idle")
                return self._output(chunks, preempted, kind, decodes_all=True)
            # Prefills hold the KV that they all still need: the youngest gives its share back (with its group).
            victim = max(self.running, key=lambda r: r.arrival)
            group = [m for m in self._members(victim) if m.status is RequestStatus.RUNNING]
            self._pause(group)
            preempted += group

    def _stalled(self) -> bool:
        """Some running prefill can get no slot, and no result on its way may free one."""
        if self.kv.num_available or any(r.num_pending for r in self.running):
            return False
        return self._prefilling()
