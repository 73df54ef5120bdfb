"""Constrained decoding in the engine: the sampler's allowed-token mask against a plain reference, a grammar's
greedy output against a plain loop that applies llguidance's masks on the host, sampled outputs that always
follow their grammar, unconstrained rows untouched beside constrained ones, grammar errors and "length"; the
mask worker process that holds the grammars (matchers dropped as requests end; its death fails only its
requests, and the next grammar starts a new one)."""

import json
import os
import re
import shutil
import signal
import time

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


@pytest.mark.parametrize("penalties", [{}, {"repetition_penalty": 1.6, "frequency_penalty": 0.4}],
                         ids=["plain", "penalties"])
def test_greedy_regex_output_matches_a_plain_loop_with_host_masks(engine, penalties):
    tok = engine.tokenizer
    prompt = tok.encode(PROMPT_TEXT)
    regex = r"[0-9]{2,4}-[a-z]{3} (yes|no)"
    got, events = run(engine, prompt, [SamplingParams(max_new_tokens=16, guided=Guided("regex", regex),
                                                      **penalties)])
    reference = GreedyReference(engine.runner.model, engine.runner.params)
    rep, freq = penalties.get("repetition_penalty", 1.0), penalties.get("frequency_penalty", 0.0)
    lltok = llguidance.hf.from_tokenizer(tok, eos_token=[2])
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_regex(regex))
    seq, expected = list(prompt), []
    while not matcher.is_stopped() and len(expected) < 16:
        bits = np.frombuffer(matcher.compute_bitmask(), np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:VOCAB].astype(bool)
        logits = reference.logits(seq)[-1]
        counts = np.bincount(np.asarray(expected, np.int64), minlength=logits.shape[0])  # outputs only (LightLLM)
        penalised = np.where(logits > 0, logits / rep, logits * rep) - freq * counts
        logits = np.where(counts > 0, penalised, logits)
        token = int(np.argmax(np.where(allowed, logits, -np.inf)))
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


def test_two_devices_give_the_constrained_tokens_of_one(engine):
    """--tp 2 (the model's logits split over the vocabulary): a sampled row under a grammar, with penalties,
    gives the tokens of one device."""
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    params = [SamplingParams(do_sample=True, temperature=1.0, seed=5, max_new_tokens=8, repetition_penalty=1.6,
                             guided=Guided("regex", r"[0-9]{2,4}-[a-z]{3} (yes|no)"))]
    _, one = run(engine, prompt, params)
    with make_engine(engine.args.model_dir, eos_id=[2], tokenizer_mode="fast", tp=2) as two_devices:
        assert len(two_devices.runner.mesh.devices.ravel()) == 2
        _, two = run(two_devices, prompt, params)
    assert [[e.token_id for e in ev] for ev in two] == [[e.token_id for e in ev] for ev in one]


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
    grammars = engine.grammars()
    first = grammars.constraint(Guided("regex", "(ab)+c"))
    cached = grammars.stats()["grammars"]
    second = grammars.constraint(Guided("regex", "(ab)+c", field="other"))
    assert grammars.stats()["grammars"] == cached and first.key != second.key
    first.release()
    second.release()


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
    constrained.constraint.release()


@pytest.fixture(scope="module")
def compiler(smollm2_dir):
    """The mask worker's grammar side, in this process, over SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from jaxllm.engine.grammar import GrammarCompiler
    from jaxllm.engine.mask_client import tokenizer_json

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    compiler = GrammarCompiler(llguidance.LLTokenizer(tokenizer_json(tokenizer), eos_token=2))
    compiler.hf = tokenizer
    return compiler


def test_a_model_with_several_eos_ids_ends_a_grammar_on_any_of_them(compiler):
    """Llama-3 configs list several eos ids: llguidance gets one, the worker accepts every one of them."""
    from jaxllm.engine.grammar import StepRows, take_token

    matcher = compiler.matcher("choice", '["x"]', "guided_choice")
    assert take_token(matcher, compiler.hf.convert_tokens_to_ids("x"), (2, 0)) is None
    row = np.zeros((1, (VOCAB + 31) // 32), np.int32)
    StepRows(VOCAB, (2, 0)).fill([matcher], row)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    assert bits[2] == 1 and bits[0] == 1 and bits.sum() == 2
    assert take_token(matcher, 0, (2, 0)) is None  # the second eos id ends it like the first
    assert "rejected token 5" in take_token(compiler.matcher("choice", '["x"]', "f"), 5, (2, 0))
    # A step's rows together: a batch of eos alone (nothing for llguidance to consume), then a mixed one.
    rows = StepRows(VOCAB, (2, 0))
    assert rows.take([(matcher, 2)]) == [None]
    fresh = [compiler.matcher("choice", '["x"]', "f") for _ in range(2)]
    x = compiler.hf.convert_tokens_to_ids("x")
    errors = rows.take([(fresh[0], x), (matcher, 0), (fresh[1], 5)])
    assert errors[:2] == [None, None] and "rejected token 5" in errors[2] and fresh[0].is_stopped()


def test_a_padded_vocabulary_fills_many_rows_like_one_at_a_time(compiler, monkeypatch):
    """A model vocabulary wider than the tokenizer's (padded): the rows built together in llguidance's threads
    (as many as $JAXLLM_GRAMMAR_THREADS says) equal those built one by one, and the model's extra ids stay
    disallowed; a request gone allows eos only."""
    from jaxllm.engine.grammar import StepRows, take_token

    words = (VOCAB + 4 * 32 + 7 + 31) // 32
    monkeypatch.setenv("JAXLLM_GRAMMAR_THREADS", "3")
    filler = StepRows(VOCAB, (2,))
    assert filler.threads == 3
    specs = [("regex", "(ab)+c"), ("choice", '["yes", "no"]'), ("json_object", "")]
    prefixes = [["ab", "ab"], ["y"], ["{"]]

    def at_prefix(k):
        matcher = compiler.matcher(*specs[k], "f")
        for piece in prefixes[k]:
            assert take_token(matcher, compiler.hf.convert_tokens_to_ids(piece), (2,)) is None
        return matcher

    together = np.full((5, words), -1, np.int32)
    filler.fill([at_prefix(0), None, at_prefix(1), at_prefix(2)], together)
    for k, row in [(0, 0), (1, 2), (2, 3)]:
        alone = np.full((1, words), -1, np.int32)
        filler.fill([at_prefix(k)], alone)
        np.testing.assert_array_equal(together[row], alone[0])
        bits = np.unpackbits(together[row].view(np.uint8), bitorder="little")
        assert 0 < bits.sum() < VOCAB and not bits[VOCAB:].any()
    gone = np.unpackbits(together[1].view(np.uint8), bitorder="little")
    assert gone[2] == 1 and gone.sum() == 1
    assert (together[4] == -1).all()  # rows not asked for are untouched


def test_the_worker_drops_a_request_s_matcher_when_it_ends(engine):
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    run(engine, prompt, [SamplingParams(max_new_tokens=8, guided=Guided("regex", "[a-z]{3}"))] * 3)
    deadline = time.monotonic() + 5  # the drops travel on the step channel, this question on the control one
    while engine.grammars().stats()["matchers"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.grammars().stats()["matchers"] == 0


def test_a_dead_mask_worker_fails_its_requests_and_the_next_grammar_gets_a_new_one(engine):
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    grammars = engine.grammars()
    pid, restarts = grammars.worker().pid, grammars.restarts
    endless = SamplingParams(max_new_tokens=50, guided=Guided("regex", "[0-9]{40}"))  # 40 tokens at least
    free = SamplingParams(max_new_tokens=12, ignore_eos=True)
    streams = engine.submit_many([(prompt, endless, None), (prompt, free, None)])
    os.kill(pid, signal.SIGKILL)
    constrained, unconstrained = (list(s) for s in streams)
    assert constrained[-1].finish_reason == "error"
    assert f"the grammar worker (pid {pid}) died (killed by SIGKILL)" in constrained[-1].error
    assert unconstrained[-1].finish_reason == "length" and len(unconstrained) == 12  # its neighbour goes on
    texts, events = run(engine, prompt, [SamplingParams(max_new_tokens=8, guided=Guided("regex", "[a-z]{3}"))])
    assert re.fullmatch("[a-z]{3}", texts[0]) and events[0][-1].finish_reason == "stop"
    assert grammars.restarts == restarts + 1 and grammars.worker().pid != pid


def test_a_grammar_s_matchers_come_from_its_families_in_turn_and_agree(compiler):
    """Requests of one grammar copy their matchers from up to `families` templates compiled apart (one template's
    copies share a lexer behind one lock); every family builds the same masks, and a new family is compiled only
    when its turn first comes."""
    from jaxllm.engine.grammar import GrammarCompiler, StepRows, take_token

    families = GrammarCompiler(compiler.tokenizer, families=3)
    spec = ("regex", "(ab|cd)+e")
    matchers = [families.matcher(*spec, "f") for _ in range(2)]
    assert len(families._cache[spec].compiled) == 2
    matchers += [families.matcher(*spec, "f") for _ in range(3)]
    assert len(families._cache[spec].compiled) == 3
    for m in matchers:
        for piece in ["ab", "cd"]:
            assert take_token(m, compiler.hf.convert_tokens_to_ids(piece), (2,)) is None
    masks = np.zeros((len(matchers), (VOCAB + 31) // 32), np.int32)
    StepRows(VOCAB, (2,), threads=2).fill(matchers, masks)
    assert (masks == masks[0]).all() and masks[0].any()
    with pytest.raises(ValueError, match="invalid regex"):
        families.matcher("regex", "(ab", "guided_regex")


def test_the_masked_sampler_compiles_once_per_size_and_says_so(engine, caplog):
    """Compiled when first met and logged as a compile while serving (on a GPU it makes XLA record every step's
    command buffers again); the same sizes again reuse it."""
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    params = [SamplingParams(max_new_tokens=3, guided=Guided("regex", "[a-z]{3}"))] * 2
    engine.runner._samplers.clear()
    with caplog.at_level("INFO", logger="jaxllm.engine.runner"):
        run(engine, prompt, params)
        first = [r.getMessage() for r in caplog.records if "masked sampler" in r.getMessage()]
        run(engine, prompt, params)
        both = [r.getMessage() for r in caplog.records if "masked sampler" in r.getMessage()]
    assert first and all("while serving" in m for m in first)
    assert both == first
