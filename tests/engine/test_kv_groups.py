"""KV accounting with sequence groups, without a device: a group's prompt is held once, forks share slots by
reference, and under thousands of random operations (groups and singles, beam-style reassignments, aborts,
preemption, the prompt cache, splitfuse) free + cached + distinct held slots = total, no slot is freed twice,
and everything comes back when the traffic ends."""

import numpy as np
import pytest

from jaxllm.engine.beam import BeamSearch
from jaxllm.engine.group import SequenceGroup, member_params
from jaxllm.engine.request import Request, RequestStatus, SamplingParams
from jaxllm.engine.splitfuse import SplitFuseScheduler
from sched_helpers import EOS, make_scheduler


def make_group(first_id: int, prompt: list[int], best_of: int, beam: bool = False, **params) -> list[Request]:
    p = SamplingParams(best_of=best_of, n=best_of, **params)
    members = [Request(f"r{first_id + i}", list(prompt), member_params(p, i), seed=i, arrival=first_id + i)
               for i in range(best_of)]
    SequenceGroup(members, BeamSearch(best_of, [EOS], p.max_new_tokens, p.ignore_eos) if beam else None)
    return members


def test_a_group_holds_its_prompt_once_and_each_member_its_own_outputs():
    sched = make_scheduler(capacity=2000)
    members = make_group(0, [7] * 100, best_of=8, max_new_tokens=50, ignore_eos=True)
    for m in members:
        sched.add(m)
    out = sched.schedule()
    assert [(c.request, c.num_tokens) for c in out.chunks] == [(members[0], 100)] + [(m, 0) for m in members[1:]]
    assert all(c.logits_from is members[0] for c in out.chunks[1:])
    assert [(f.request, f.start, f.stop) for f in out.fills] == [(m, 0, 100) for m in members[1:]]
    assert sched.kv.num_used == 100  # the prompt once, each member's row pointing at it
    for step in range(1, 4):
        for c in out.chunks:
            c.request.num_pending += 1
        for c in out.chunks:
            c.request.num_pending -= 1
            c.request.output_ids.append(9)
        out = sched.schedule()
        assert out.kind == "decode" and len(out.chunks) == 8
        assert sched.kv.num_used == 100 + 8 * step
    sched.kv.check(sched.running)
    # Admission counted the group's peak as the prompt once plus best_of outputs.
    assert sched.estimated_peak() <= 100 + 8 * 50 + 8


def test_a_group_that_cannot_fit_is_refused_up_front():
    from types import SimpleNamespace

    from jaxllm.engine.scheduler import check_prompt

    args = SimpleNamespace(max_req_input_len=100, max_req_total_len=200, max_total_token_num=400,
                           long_truncation_mode=None)
    check_prompt([5] * 50, SamplingParams(best_of=4, n=4, max_new_tokens=80), args)  # 50 + 320 + 1 fits
    with pytest.raises(ValueError, match="best_of"):
        check_prompt([5] * 50, SamplingParams(best_of=5, n=5, max_new_tokens=80), args)


class Traffic:
    """Random groups and singles through a scheduler, the engine's protocol replayed on the host: dispatch a
    step, read the one before; tokens are random, beams move between their members at random."""

    def __init__(self, sched, rng, beams: bool):
        self.sched, self.rng, self.beams = sched, rng, beams
        self.next_id = 0
        self.live: list[Request] = []
        self.inflight = None  # the dispatched step not read yet
        self.preempted = 0

    def step(self):
        """Schedule and dispatch a step, read the one before, check the invariants."""
        sched = self.sched
        out = sched.schedule() if sched.has_work() else None
        if out is not None:
            self.preempted += len(out.preempted)
            for chunk in out.chunks:
                if chunk.samples:
                    chunk.request.num_pending += 1
            sched.step_dispatched(out)
        if self.inflight is not None:
            self.read(self.inflight)
        self.inflight = out if out is not None and out.chunks else None
        self.check()

    def submit(self):
        rng = self.rng
        prompt = [int(t) for t in rng.integers(3, 6, size=int(rng.integers(1, 24)))]  # few ids: cache hits
        best_of = int(rng.choice([1, 2, 3, 4]))
        max_new = int(rng.integers(1, 20))
        if best_of == 1:
            members = [Request(f"r{self.next_id}", prompt, SamplingParams(max_new_tokens=max_new), seed=0,
                               arrival=self.next_id)]
        else:
            members = make_group(self.next_id, prompt, best_of, beam=self.beams and rng.random() < 0.5,
                                 max_new_tokens=max_new)
        self.next_id += len(members)
        for m in members:
            self.sched.add(m)
        self.live += members

    def abort_one(self):
        alive = [r for r in self.live if not r.finished]
        if alive:
            victim = alive[int(self.rng.integers(len(alive)))]
            for m in victim.group.members if victim.group else [victim]:
                if not m.finished:
                    self.sched.finish(m, "abort")

    def read(self, out):
        rng, sched = self.rng, self.sched
        moved = {}
        for chunk in out.chunks:
            req = chunk.request
            if chunk.samples:
                req.num_pending -= 1
            if req.finished or not chunk.samples:
                continue
            if req.group is not None and req.group.beam is not None:
                moved[id(req.group)] = req.group
                continue
            token = EOS if rng.random() < 0.1 else 9
            req.output_ids.append(token)
            if token == EOS or len(req.output_ids) >= req.params.max_new_tokens:
                sched.finish(req, "stop")
        for group in moved.values():
            self.move_beams(group)

    def move_beams(self, group):
        live = [m for m in group.members[: group.beam.live] if not m.finished]
        if any(m.num_pending or m.remaining for m in live) or not live:
            return  # some beam still computes (a resumed member's outputs): the round waits for it
        if len(live[0].output_ids) + 1 >= live[0].params.max_new_tokens or self.rng.random() < 0.1:
            for m in group.members:
                if not m.finished:
                    self.sched.finish(m, "stop")
            return
        parents = [live[int(self.rng.integers(len(live)))] for _ in live]
        if self.rng.random() < 0.2 and len(parents) > 1:
            parents = parents[:-1]  # one beam fewer: the last member waits, holding nothing
        moves = [(m, p.slots[: p.num_computed]) for m, p in zip(group.members, parents)]
        outputs = [p.output_ids + [9] for p in parents]
        moves += [(m, []) for m in group.members[len(parents):]]
        outputs += [[] for _ in group.members[len(parents):]]
        group.beam.live = len(parents)
        self.sched.reassign(moves)
        for (m, _), ids in zip(moves, outputs):
            m.output_ids = ids

    def check(self):
        holders = [r for r in self.live if r.slots or r.kv_row >= 0]
        self.sched.kv.check(holders)
        for r in self.live:
            if r.status is not RequestStatus.RUNNING:
                assert not r.slots and r.kv_row < 0


@pytest.mark.parametrize("policy,prompt_cache,beams", [
    ("router", False, True), ("router", True, False), ("splitfuse", False, False), ("splitfuse", True, False),
])
def test_kv_invariants_hold_under_random_traffic_with_groups(policy, prompt_cache, beams):
    rng = np.random.default_rng(7)
    kwargs = dict(capacity=128, prompt_cache=prompt_cache, running_max_req_size=16, router_token_ratio=1.0,
                  router_max_new_token_len=1, router_max_wait_tokens=2, batch_max_tokens=128)
    if policy == "splitfuse":
        kwargs.update(policy=SplitFuseScheduler, splitfuse_block_size=24)
    sched = make_scheduler(**kwargs)
    traffic = Traffic(sched, rng, beams)
    for _ in range(600):
        if rng.random() < 0.6:
            traffic.submit()
        if rng.random() < 0.03:
            traffic.abort_one()
        traffic.step()
    while sched.has_work() or traffic.inflight is not None:  # drain
        traffic.step()
    assert traffic.preempted > 0 and traffic.next_id > 200
    kv = sched.kv
    assert kv.num_free + kv.num_cached == kv.num_slots and kv.num_used == 0
    assert (kv._owners == 0).all()
