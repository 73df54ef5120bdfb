"""Constrained decoding in the engine: the sampler's allowed-token mask against a plain reference, a grammar's
greedy output against a plain loop that applies llguidance's masks on the host, sampled outputs that always
follow their grammar, unconstrained rows untouched beside constrained ones, grammar errors and "length"."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import llguidance
import llguidance.hf
import numpy as np
import pytest

from engine_helpers import TINY_CONFIG, GreedyReference, make_engine
from jaxllm.engine.constraints import allow, step_masks
from jaxllm.engine.request import Guided, SamplingParams
from jaxllm.engine.sampler import apply_token_mask

VOCAB = 49152  # SmolLM2's tokenizer over a tiny random model
PROMPT_TEXT = "The answer is"


@pytest.fixture(scope="module")
def engine(smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-with-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(smollm2_dir / name, path / name)
    config = dict(TINY_CONFIG, vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
    (path / "config.json").write_text(json.dumps(config))
    with make_engine(path, eos_id=[2], tokenizer_mode="fast") as eng:
        yield eng


def run(engine, prompt_ids, params_list):
    streams = engine.submit_many([(prompt_ids, p, None) for p in params_list])
    events = [list(s) for s in streams]
    return ["".join(e.text for e in ev) for ev in events], events


def test_token_mask_matches_a_plain_reference():
    rng = np.random.default_rng(0)
    rows, vocab = 5, 77  # a vocabulary that is not a multiple of 32
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    mask = np.zeros((rows, (vocab + 31) // 32), np.int32)
    allowed_sets = [rng.choice(vocab, size=int(rng.integers(1, vocab)), replace=False) for _ in range(rows)]
    for row, ids in zip(mask, allowed_sets):
        allow(row, ids)
    expected = np.full_like(logits, -np.inf)
    for r, ids in enumerate(allowed_sets):
        expected[r, ids] = logits[r, ids]
    got = np.asarray(jax.jit(apply_token_mask)(jnp.asarray(logits), jnp.asarray(mask)))
    np.testing.assert_array_equal(got, expected)


def test_greedy_regex_output_matches_a_plain_loop_with_host_masks(engine):
    tok = engine.tokenizer
    prompt = tok.encode(PROMPT_TEXT)
    regex = r"[0-9]{2,4}-[a-z]{3} (yes|no)"
    got, events = run(engine, prompt, [SamplingParams(max_new_tokens=16, guided=Guided("regex", regex))])
    reference = GreedyReference(engine.runner.model, engine.runner.params)
    lltok = llguidance.hf.from_tokenizer(tok, eos_token=[2])
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_regex(regex))
    seq, expected = list(prompt), []
    while not matcher.is_stopped() and len(expected) < 16:
        bits = np.frombuffer(matcher.compute_bitmask(), np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:VOCAB].astype(bool)
        token = int(np.argmax(np.where(allowed, reference.logits(seq)[-1], -np.inf)))
        assert matcher.consume_token(token)
        seq.append(token)
        expected.append(token)
    assert [e.token_id for e in events[0]] == expected
    assert re.fullmatch(regex, got[0]) and events[0][-1].finish_reason == "stop"


def test_sampled_outputs_follow_their_grammar_beside_unconstrained_rows(engine):
    tok = engine.tokenizer
    prompt = tok.encode(PROMPT_TEXT)
    choices = ["red", "green", "blue", "dark purple"]
    regex = r"[0-9]{3}\.[a-f]{2}"
    sampled = dict(do_sample=True, temperature=1.0, max_new_tokens=12)
    free = SamplingParams(max_new_tokens=6, ignore_eos=True)
    params = ([SamplingParams(**sampled, guided=Guided("choice", json.dumps(choices)))] * 6
              + [SamplingParams(**sampled, guided=Guided("regex", regex))] * 6 + [free])
    texts, events = run(engine, prompt, params)
    assert all(t in choices for t in texts[:6]), texts[:6]
    assert all(re.fullmatch(regex, t) for t in texts[6:12]), texts[6:12]
    assert all(ev[-1].finish_reason == "stop" for ev in events[:12])
    alone, _ = run(engine, prompt, [free])
    assert texts[12] == alone[0]  # the unconstrained row is untouched by its neighbours' masks
    stats = engine.stats()
    assert stats["constrained_steps"] > 0 and stats["mask_s"] > 0


def test_a_grammar_that_cannot_finish_in_time_ends_with_length(engine):
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    texts, events = run(engine, prompt, [SamplingParams(max_new_tokens=3, guided=Guided("regex", "[0-9]{40}"))])
    assert events[0][-1].finish_reason == "length" and re.fullmatch("[0-9]{1,39}", texts[0])


@pytest.mark.parametrize("spec, words", [
    (Guided("regex", "[a-", field="guided_regex"), "guided_regex: invalid regex"),
    (Guided("json_schema", '{"type": "nonsense"}', field="response_format"), "response_format: invalid json schema"),
    (Guided("json_schema", "{not json", field="guided_json"), "guided_json: the JSON schema is not valid JSON"),
    (Guided("lark", "start: (", field="guided_grammar"), "guided_grammar: invalid lark"),
    (Guided("choice", "[]", field="guided_choice"), "guided_choice: expected a non-empty list"),
])
def test_an_invalid_grammar_is_refused_naming_its_field(engine, spec, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        engine.submit([1, 2, 3], SamplingParams(guided=spec))


def test_each_distinct_grammar_is_compiled_once(engine):
    spec = Guided("regex", "(ab)+c")
    first = engine.grammars().constraint(spec)
    cached = len(engine.grammars()._cache)
    second = engine.grammars().constraint(Guided("regex", "(ab)+c", field="other"))
    assert len(engine.grammars()._cache) == cached and first is not second


def test_step_masks_leave_unconstrained_and_padding_rows_open(engine):
    from jaxllm.engine.request import Request
    from jaxllm.engine.scheduler import ScheduledChunk as Chunk, SchedulerOutput

    constrained = Request("a", [1], SamplingParams(), seed=0, arrival=0)
    constrained.constraint = engine.grammars().constraint(Guided("choice", '["x"]'))
    free = Request("b", [1], SamplingParams(), seed=0, arrival=1)
    batch = SchedulerOutput([Chunk(constrained, 0, 1), Chunk(free, 0, 1)], [], "decode")
    mask = step_masks(batch, 4, engine.runner.mask_words)
    x = engine.tokenizer.convert_tokens_to_ids("x")
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")
    assert bits[0].sum() >= 1 and bits[0, x] == 1
    assert bits[1:].all()


def test_a_model_with_several_eos_ids_ends_a_grammar_on_any_of_them(smollm2_dir):
    """Llama-3 configs list several eos ids: llguidance gets one, the constraint accepts every one of them."""
    from transformers import AutoTokenizer

    from jaxllm.engine.grammar import GrammarCompiler

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    compiler = GrammarCompiler(tokenizer, [2, 0], mask_words=(VOCAB + 31) // 32)
    constraint = compiler.constraint(Guided("choice", '["x"]'))
    constraint.advance(tokenizer.convert_tokens_to_ids("x"))
    row = np.zeros(compiler.mask_words, np.int32)
    constraint.fill(row)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    assert bits[2] == 1 and bits[0] == 1
    constraint.advance(0)  # the second eos id ends it like the first (a token the grammar rejects raises)


def test_a_padded_vocabulary_fills_many_rows_like_one_at_a_time(smollm2_dir):
    """A model vocabulary wider than the tokenizer's (padded): the rows built together in llguidance's threads
    equal those built one by one, and the model's extra ids stay disallowed."""
    from transformers import AutoTokenizer

    from jaxllm.engine.grammar import GrammarCompiler, GrammarConstraint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    words = (VOCAB + 4 * 32 + 7 + 31) // 32
    compiler = GrammarCompiler(tokenizer, [2], mask_words=words)
    specs = [Guided("regex", "(ab)+c"), Guided("choice", '["yes", "no"]'), Guided("json_object")]
    prefixes = [["ab", "ab"], ["y"], ["{"]]

    def at_prefix(k):
        constraint = compiler.constraint(specs[k])
        for piece in prefixes[k]:
            constraint.advance(tokenizer.convert_tokens_to_ids(piece))
        return constraint

    rows = [4, 1, 6]
    together = np.full((8, words), -1, np.int32)
    GrammarConstraint.fill_many([(at_prefix(k), rows[k]) for k in range(3)], together)
    for k, row in enumerate(rows):
        alone = np.full(words, -1, np.int32)
        at_prefix(k).fill(alone)
        np.testing.assert_array_equal(together[row], alone)
        bits = np.unpackbits(together[row].view(np.uint8), bitorder="little")
        assert 0 < bits.sum() < VOCAB and not bits[VOCAB:].any()
    assert (together[[0, 2, 3, 5, 7]] == -1).all()  # rows not asked for are untouched
