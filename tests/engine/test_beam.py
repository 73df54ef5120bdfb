"""BeamSearch's rules on hand-made step results (transformers' beam search with early_stopping=True): the first
round expands the first beam only; the best 2 × width candidates by summed logprob; an ending candidate is a
hypothesis only among the best width; hypotheses scored by summed logprob ÷ generated length, best first; the
search stops with width hypotheses or when nothing can continue. And each member's move after a round."""

import numpy as np

from jaxllm.engine.beam import BeamSearch, reassignments
from jaxllm.engine.request import Request, SamplingParams

EOS = 2


def beams(width: int, outputs: list[list[int]], logprobs: list[list[float]]) -> list[Request]:
    members = []
    for i in range(width):
        req = Request(f"b{i}", [7, 7, 7], SamplingParams(best_of=width, n=width), seed=i, arrival=i)
        req.output_ids, req.output_logprobs = list(outputs[i]), list(logprobs[i])
        req.slots, req.num_computed = list(range(10 * i, 10 * i + 3 + len(outputs[i]))), 3 + len(outputs[i])
        members.append(req)
    return members


def record(search, members, tops):
    for m, top in zip(members, tops):
        ids, lps = zip(*top)
        search.record(m, np.array(ids), np.log(np.array(lps)))


def test_first_round_expands_one_beam_and_keeps_the_best_non_ending_candidates():
    search = BeamSearch(2, [EOS], max_new_tokens=10, ignore_eos=False)
    members = beams(2, [[], []], [[], []])
    record(search, members, [[(5, 0.5), (EOS, 0.3), (6, 0.1), (8, 0.05)], [(9, 0.9), (4, 0.05), (3, 0.03), (1, 0.02)]])
    assert search.ready(members)
    decided = search.advance(members)
    assert not decided.done
    assert [(c.parent, c.token) for c in decided.continuations] == [(members[0], 5), (members[0], 6)]
    # eos ranked second, among the best 2: a finished hypothesis scored over its one token.
    hyp, = search.results()
    assert hyp.tokens == [EOS] and hyp.score == np.log(0.3)


def test_an_ending_candidate_outside_the_best_width_is_dropped_and_width_hypotheses_stop_the_search():
    search = BeamSearch(2, [EOS], max_new_tokens=10, ignore_eos=False)
    members = beams(2, [[5], [6]], [[np.log(0.5)], [np.log(0.4)]])
    record(search, members, [[(7, 0.6), (8, 0.3), (EOS, 0.05), (1, 0.04)], [(EOS, 0.2), (9, 0.1), (3, 0.05), (1, 0.01)]])
    # totals: 0.5·0.6=.30 (7), 0.5·0.3=.15 (8), 0.4·0.2=.08 (eos, rank 2 ≥ width: dropped), 0.4·0.1=.04, ...
    decided = search.advance(members)
    assert [(c.parent.request_id, c.token) for c in decided.continuations] == [("b0", 7), ("b0", 8)]
    assert search.results() == [] and not decided.done
    moved = beams(2, [[5, 7], [5, 8]], [[np.log(0.5), np.log(0.6)], [np.log(0.5), np.log(0.3)]])
    record(search, moved, [[(EOS, 0.9), (4, 0.05), (3, 0.03), (1, 0.01)], [(EOS, 0.9), (4, 0.05), (3, 0.03), (1, 0.01)]])
    decided = search.advance(moved)
    assert decided.done
    first, second = search.results()
    assert first.tokens == [5, 7, EOS] and second.tokens == [5, 8, EOS] and first.score > second.score
    assert first.score == sum(first.logprobs) / 3


def test_max_new_tokens_ends_every_candidate_and_the_best_width_become_hypotheses():
    search = BeamSearch(2, [EOS], max_new_tokens=2, ignore_eos=False)
    members = beams(2, [[5], [6]], [[np.log(0.5)], [np.log(0.4)]])
    record(search, members, [[(7, 0.6), (8, 0.3), (9, 0.05), (1, 0.04)], [(3, 0.9), (9, 0.1), (4, 0.05), (1, 0.01)]])
    decided = search.advance(members)
    assert decided.done and [h.tokens for h in search.results()] == [[6, 3], [5, 7]]


def test_each_member_continues_from_its_parent_and_the_rest_wait_holding_nothing():
    search = BeamSearch(3, [EOS], max_new_tokens=10, ignore_eos=False)
    members = beams(3, [[5], [6], [4]], [[-0.1], [-0.2], [-9.0]])
    record(search, members, [[(7, 0.9)] + [(EOS, 0.01)] * 5, [(8, 0.9)] + [(1, 0.01)] * 5, [(9, 0.9)] * 6])
    decided = search.advance(members)
    moves = reassignments(members, decided.continuations[:2])
    assert [(m.member, m.output_ids) for m in moves] == [(members[0], [5, 7]), (members[1], [6, 8]), (members[2], [])]
    assert moves[0].slots == members[0].slots and moves[2].slots == []
