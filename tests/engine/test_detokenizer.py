"""Tokenizer loading, incremental detokenization (checked against whole-sequence decode) and stop strings."""

import copy
import json
import logging
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxllm.engine.detokenizer import IncrementalDetokenizer, StopMatcher, _decoder, _vocab_info, load_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog. It wasn't me, she said!",
    "今天天气很好，我们去公园散步吧。北京是中国的首都。",
    "Emoji time 🙂🚀 with family 👨‍👩‍👧 and flags 🇫🇷 — done ✅",
    "naïve café résumé, Ångström and Ωmega; 日本語のテキストも少し。",
    "Code:\n    def f(x):\n        return x ** 2  # squares\n\n\tTabs\tand  double  spaces",
]
FLAGS = [(True, True), (True, False), (False, True), (False, False)]  # (skip_special_tokens, spaces_between)


# ---------------------------------------------------------------- tokenizers under test


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_tokenizer(str(smollm2_dir), "fast")


def _unigram_metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece-style: Unigram over characters with '▁' word marks and a Metaspace decoder."""
    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                     show_progress=False)
    tk.train_from_iterator(SENTENCES * 4, trainer)
    tk.add_tokens([AddedToken("<tool>", special=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _bpe_byte_fallback() -> PreTrainedTokenizerFast:
    """Llama-2-style: BPE with '▁' word marks, <0xNN> byte fallback for unseen characters, and the
    Replace/ByteFallback/Fuse/Strip decoder. Trained on English only, so CJK and emoji become byte tokens."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator([SENTENCES[0], SENTENCES[4]] * 4,
                           trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                               show_progress=False))
    model = json.loads(tk.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    bt = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    bt.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bt.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bt.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("<s>", special=True),
                           AddedToken("</s>", special=True)])
    bt.add_tokens([AddedToken("<tool>", special=False)])
    return PreTrainedTokenizerFast(tokenizer_object=bt, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sp_tokenizers():
    return {"unigram_metaspace": _unigram_metaspace(), "bpe_byte_fallback": _bpe_byte_fallback()}


@pytest.fixture(scope="module")
def byt5_dir(tmp_path_factory):
    """A model directory whose tokenizer exists only as a slow (Python) class: ByT5, one token per UTF-8 byte,
    which needs no vocabulary file and whose decode() drops incomplete bytes instead of writing U+FFFD."""
    path = tmp_path_factory.mktemp("byt5")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer"}))
    return path


@pytest.fixture(scope="module", params=["smollm2", "unigram_metaspace", "bpe_byte_fallback", "byt5_slow"])
def tokenizer(request, sp_tokenizers):
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")
    if request.param == "byt5_slow":
        return load_tokenizer(str(request.getfixturevalue("byt5_dir")), "slow")
    return sp_tokenizers[request.param]


# ---------------------------------------------------------------- the reference: whole-sequence decode


def reference_text(tok, prompt, output, skip, spaces):
    """What the output's text must be, from whole-sequence `tok.decode` calls (no incremental state)."""
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    added = {i: t.content for i, t in tok.added_tokens_decoder.items()}
    prompt = [i for i in prompt if not (skip and i in special)]
    output = [i for i in output if not (skip and i in special)]
    if not spaces:
        full, head = tok.decode(prompt + output), tok.decode(prompt)
        assert full.startswith(head)
        return full[len(head):]
    # Pieces: runs of ordinary tokens, and added tokens; the first run is decoded after the prompt's last run.
    cut = max((k for k, i in enumerate(prompt) if i in added), default=-1)
    context = prompt[cut + 1:]
    pieces, run, first_run = [], [], True

    def close_run():
        nonlocal first_run
        if first_run:
            pieces.append(tok.decode(context + run)[len(tok.decode(context)):])
        elif run:
            pieces.append(tok.decode(run))
        first_run = False
        run.clear()

    for i in output:
        if i in added:
            close_run()
            pieces.append(added[i])
        else:
            run.append(i)
    close_run()
    return " ".join(p for p in pieces if p)


def detokenize(tok, prompt, output, skip=True, spaces=True):
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    pieces = [det.add(i) for i in output]
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == det.text
    return det.text, pieces


def chat_prompt(tok, user):
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode(user, add_special_tokens=False)


# ---------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_modes(smollm2_dir):
    assert load_tokenizer(str(smollm2_dir), "fast").is_fast
    assert load_tokenizer(str(smollm2_dir), "auto").is_fast
    with pytest.raises(ValueError, match="tokenizer_mode 'turbo'"):
        load_tokenizer(str(smollm2_dir), "turbo")


def test_slow_mode_falls_back_to_fast_with_one_warning(tmp_path, sp_tokenizers, caplog):
    tok_dir = tmp_path / "tok"
    sp_tokenizers["unigram_metaspace"].save_pretrained(tok_dir)
    with caplog.at_level(logging.WARNING, logger="jaxllm.engine.detokenizer"):
        first = load_tokenizer(str(tok_dir), "slow")
        second = load_tokenizer(str(tok_dir))
    warnings = [r for r in caplog.records if r.name == "jaxllm.engine.detokenizer"]
    assert len(warnings) == 1 and "no slow tokenizer" in warnings[0].getMessage()
    assert first.is_fast and second.is_fast
    ids = first.encode("The quick brown fox")
    assert first.decode(ids) == sp_tokenizers["unigram_metaspace"].decode(ids) == "The quick brown fox"


def test_slow_only_tokenizer(byt5_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxllm.engine.detokenizer"):
        assert not load_tokenizer(str(byt5_dir), "slow").is_fast
        assert not load_tokenizer(str(byt5_dir), "auto").is_fast  # auto: fast if there is one, else slow
    assert not [r for r in caplog.records if r.name == "jaxllm.engine.detokenizer"]
    with pytest.raises(ValueError, match="no fast tokenizer"):
        load_tokenizer(str(byt5_dir), "fast")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"), "fast")
    with pytest.raises(OSError, match="no usable tokenizer"):
        load_tokenizer(str(tmp_path), "auto")


# ---------------------------------------------------------------- incremental decoding


@pytest.mark.parametrize("skip,spaces", FLAGS)
def test_sentences_match_full_decode(tokenizer, skip, spaces):
    for sentence in SENTENCES:
        prompt = chat_prompt(tokenizer, "Say something.")
        output = tokenizer.encode(sentence, add_special_tokens=False)
        text, pieces = detokenize(tokenizer, prompt, output, skip, spaces)
        assert text == reference_text(tokenizer, prompt, output, skip, spaces)
        assert not any("\ufffd" in p for p in pieces), pieces
        if skip or spaces:
            assert text.strip() == sentence.strip()


def test_multibyte_characters_are_held_until_complete(smollm2):
    output = smollm2.encode(" 🙂 家", add_special_tokens=False)
    assert len(output) > 2  # the emoji and the CJK character are split over byte-level tokens
    text, pieces = detokenize(smollm2, smollm2.encode("Hi"), output)
    assert text == " 🙂 家"
    assert "" in pieces and not any("\ufffd" in p for p in pieces)


def random_output(tok, rng, length, fragments):
    """Random ids: ordinary tokens, special and added tokens, multi-byte characters split over tokens, and
    (where the decoder replaces invalid bytes locally, as byte-level BPE does) stray partial-UTF-8 tokens.
    SentencePiece's ByteFallback decoder turns a whole run of byte tokens into U+FFFD when any byte in it is
    invalid, so for it bytes come only as complete characters."""
    vocab = len(tok)
    backend = getattr(tok, "backend_tokenizer", None)  # None for a slow (Python) tokenizer
    stray_bytes_ok = backend is None or "ByteFallback" not in str(backend.decoder)
    ordinary = range(vocab) if stray_bytes_ok else sorted(set(range(vocab)) - set(fragments))
    specials = sorted(tok.added_tokens_decoder)
    out = []
    while len(out) < length:
        kind = rng.random()
        if kind < 0.25:
            out += tok.encode(rng.choice("家🙂é€👨‍👩‍👧日本"), add_special_tokens=False)
        elif kind < 0.45 and fragments and stray_bytes_ok:
            out.append(rng.choice(fragments))
        elif kind < 0.55:
            out.append(rng.choice(specials))
        else:
            out.append(rng.choice(ordinary))
    return out


@pytest.mark.parametrize("skip,spaces", FLAGS)
def test_random_token_sequences_match_full_decode(tokenizer, skip, spaces):
    rng = random.Random(1234 + 2 * skip + spaces)
    terminator = tokenizer.encode(".", add_special_tokens=False)[-1]
    fragments = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]  # partial UTF-8 alone
    for _ in range(25):
        prompt = chat_prompt(tokenizer, rng.choice(SENTENCES))
        output = random_output(tokenizer, rng, rng.randint(1, 40), fragments)
        output.append(terminator)  # ends any held-back character, so all the text is out
        text, _ = detokenize(tokenizer, prompt, output, skip, spaces)
        assert text == reference_text(tokenizer, prompt, output, skip, spaces), output


def test_prompt_context_keeps_word_initial_space(sp_tokenizers):
    tok = sp_tokenizers["bpe_byte_fallback"]
    prompt = tok.encode("The quick brown", add_special_tokens=False)
    output = tok.encode("The quick brown fox", add_special_tokens=False)[len(prompt):]
    assert tok.convert_ids_to_tokens(output)[0].startswith("▁")
    assert detokenize(tok, prompt, output)[0] == " fox"       # a continuation of the prompt's text
    assert detokenize(tok, [], output)[0] == tok.decode(output) == "fox"  # no context: as decode() alone


def test_special_tokens_and_spaces_between_them(smollm2):
    hi, there = (smollm2.encode(t, add_special_tokens=False) for t in ("Hi", "there"))
    end = smollm2.convert_tokens_to_ids("<|im_end|>")
    output = hi + [end] + there
    prompt = smollm2.encode("Hello", add_special_tokens=False)
    assert detokenize(smollm2, prompt, output, skip=True, spaces=True)[0] == "Hithere"
    assert detokenize(smollm2, prompt, output, skip=False, spaces=True)[0] == "Hi <|im_end|> there"
    assert detokenize(smollm2, prompt, output, skip=False, spaces=False)[0] == "Hi<|im_end|>there"
    text, pieces = detokenize(smollm2, prompt, [end], skip=True)
    assert text == "" and pieces == [""]


def test_non_special_added_tokens_are_kept(sp_tokenizers):
    tok = sp_tokenizers["unigram_metaspace"]
    tool = tok.convert_tokens_to_ids("<tool>")
    output = tok.encode("quick", add_special_tokens=False) + [tool] + tok.encode("fox", add_special_tokens=False)
    assert detokenize(tok, [], output, skip=True, spaces=True)[0] == "quick <tool> fox"
    assert detokenize(tok, [], output, skip=True, spaces=False)[0] == tok.decode(output) == "quick<tool> fox"


class RecordingTokenizer:
    """The real tokenizer, recording how many ids each decode() call gets."""

    def __init__(self, tok):
        self._tok, self.window_lengths = tok, []

    def decode(self, ids, **kwargs):
        self.window_lengths.append(len(ids))
        return self._tok.decode(ids, **kwargs)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


class RecordingBackend(RecordingTokenizer):
    """The Rust tokenizer of a fast tokenizer, recording its decode() calls."""


def recording_fast(tok):
    """A copy of the fast tokenizer `tok` whose Rust backend records its decode() calls."""
    fast = copy.copy(tok)
    fast._tokenizer = RecordingBackend(tok.backend_tokenizer)
    return fast


def test_cost_per_token_is_constant(smollm2):
    long_text = " ".join(SENTENCES) * 20
    output = smollm2.encode(long_text, add_special_tokens=False)
    assert len(output) > 1500
    prompt = chat_prompt(smollm2, "Go on.")
    # Through transformers' decode (any tokenizer): a window of a few tokens, at most two decodes per token.
    recorder = RecordingTokenizer(smollm2)
    det = IncrementalDetokenizer(recorder, prompt)
    for token_id in output:
        det.add(token_id)
    assert det.text == long_text
    assert max(recorder.window_lengths) <= 12
    assert len(recorder.window_lengths) <= 2 * len(output) + 1
    # A fast byte-level tokenizer: its Rust decode alone, once per token.
    fast = recording_fast(smollm2)
    det = IncrementalDetokenizer(fast, prompt)
    for token_id in output:
        det.add(token_id)
    assert det.text == long_text
    calls = fast.backend_tokenizer.window_lengths
    assert max(calls) <= 12 and len(calls) <= len(output) + 1


# ---------------------------------------------------------------- the Rust decode path against transformers' decode


def _with_cleanup(tok, forced=False):
    """A copy of `tok` asking for clean_up_tokenization_spaces (which transformers ignores for BPE unless forced)."""
    tok = copy.copy(tok)
    tok.clean_up_tokenization_spaces = True
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = forced
    return tok


@pytest.fixture(scope="module", params=["smollm2", "unigram_metaspace", "bpe_byte_fallback", "unigram_cleanup",
                                        "smollm2_cleanup_ignored", "smollm2_cleanup_forced"])
def fast_tokenizer(request, sp_tokenizers):
    name = request.param
    if name.startswith("smollm2"):
        smollm2 = request.getfixturevalue("smollm2")
        return {"smollm2": smollm2, "smollm2_cleanup_ignored": _with_cleanup(smollm2),
                "smollm2_cleanup_forced": _with_cleanup(smollm2, forced=True)}[name]
    if name == "unigram_cleanup":
        return _with_cleanup(sp_tokenizers["unigram_metaspace"])
    return sp_tokenizers[name]


def test_fast_tokenizers_take_the_rust_path(smollm2, sp_tokenizers):
    for tok in (smollm2, *sp_tokenizers.values()):
        assert _vocab_info(tok).backend is tok.backend_tokenizer
    assert _decoder(smollm2, _vocab_info(smollm2))[1]                      # ByteLevel: one decode per token
    assert not _decoder(_with_cleanup(smollm2, forced=True), _vocab_info(smollm2))[1]
    for tok in sp_tokenizers.values():                                      # SentencePiece-style decoders
        assert not _decoder(tok, _vocab_info(tok))[1]
    assert _vocab_info(RecordingTokenizer(smollm2)).backend is None         # not a TokenizersBackend


def test_cleanup_is_applied_as_transformers_does(smollm2, sp_tokenizers):
    ids = smollm2.encode("Hi , there .", add_special_tokens=False)
    assert _with_cleanup(smollm2).decode(ids) == smollm2.decode(ids) == "Hi , there ."    # ignored for BPE
    assert detokenize(_with_cleanup(smollm2), [], ids)[0] == "Hi , there ."
    assert detokenize(_with_cleanup(smollm2, forced=True), [], ids)[0] == "Hi, there."
    uni = _with_cleanup(sp_tokenizers["unigram_metaspace"])
    ids = uni.encode("it , is .", add_special_tokens=False)
    assert uni.decode(ids) == "it, is."
    assert detokenize(uni, [], ids) == detokenize(RecordingTokenizer(uni), [], ids)


def test_overridden_decode_is_respected(sp_tokenizers):
    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    tok = Shouting(tokenizer_object=sp_tokenizers["unigram_metaspace"].backend_tokenizer, unk_token="<unk>")
    assert _vocab_info(tok).backend is None
    ids = tok.encode("quick fox", add_special_tokens=False)
    assert detokenize(tok, [], ids)[0] == "QUICK FOX"


def _fragments(tok):
    """Ids whose text alone is partial UTF-8."""
    backend = tok.backend_tokenizer
    return [i for i in range(len(tok)) if "\ufffd" in backend.decode([i], skip_special_tokens=False)]


@pytest.mark.parametrize("skip,spaces", FLAGS)
def test_rust_path_streams_as_transformers_decode(fast_tokenizer, skip, spaces):
    """Every add()'s piece, on random prompts and outputs (partial and invalid UTF-8, special and added tokens,
    contexts that end inside a character, outputs that end held back), is that of the same algorithm decoding
    with transformers' tokenizer.decode (a tokenizer wrapper that is no TokenizersBackend), and the text is
    that of whole-sequence decodes (but for clean_up_tokenization, which an incremental decode cannot match:
    it applies to each window's text)."""
    tok = fast_tokenizer
    rng = random.Random(99 + 2 * skip + spaces)
    fragments = _fragments(tok)
    for _ in range(40):
        prompt = chat_prompt(tok, rng.choice(SENTENCES)) + random_output(tok, rng, rng.randint(0, 6), fragments)
        output = random_output(tok, rng, rng.randint(1, 60), fragments)
        split = rng.random() < 0.3  # a character's tokens split between the prompt's end and the output's start
        if split:
            char = tok.encode(rng.choice("家🙂€👨‍👩‍👧日本"), add_special_tokens=False)
            cut = rng.randint(1, len(char))
            prompt, output = prompt + char[:cut], char[cut:] + output
        _, fast_pieces = detokenize(tok, prompt, output, skip, spaces)
        _, pieces = detokenize(RecordingTokenizer(tok), prompt, output, skip, spaces)
        assert fast_pieces == pieces, (prompt, output)
        if not (split or tok.clean_up_tokenization_spaces):
            output.append(tok.encode(".", add_special_tokens=False)[-1])  # ends any held-back character
            text, _ = detokenize(tok, prompt, output, skip, spaces)
            assert text == reference_text(tok, prompt, output, skip, spaces), (prompt, output)


# ---------------------------------------------------------------- stop strings


def run_stops(stops, chunks):
    matcher = StopMatcher(stops)
    out = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def first_stop_reference(stops, text):
    ends = [text.find(s) + len(s) for s in stops if s and s in text]
    return (text[:min(ends)], True) if ends else (text, False)


def stream_with_stops(tok, text, stops):
    """The engine's pipeline: tokens → IncrementalDetokenizer → StopMatcher; (text, stopped, tokens used)."""
    det, matcher, out = IncrementalDetokenizer(tok, tok.encode("Q:")), StopMatcher(stops), []
    ids = tok.encode(text, add_special_tokens=False)
    for n, token_id in enumerate(ids, 1):
        emitted, stopped = matcher.feed(det.add(token_id))
        out.append(emitted)
        if stopped:
            return "".join(out), True, n
    return "".join(out) + matcher.flush(), False, len(ids)


def test_stop_string_as_single_token(smollm2):
    text = "The capital of France is Paris. It is big."
    assert len(smollm2.encode(" Paris", add_special_tokens=False)) == 1
    out, stopped, n = stream_with_stops(smollm2, text, [" Paris"])
    assert (out, stopped) == ("The capital of France is Paris", True)
    assert n == len(smollm2.encode("The capital of France is Paris", add_special_tokens=False))


def test_stop_string_spanning_tokens_and_starting_mid_token(smollm2):
    text = "The capital of France is Paris. It is big."
    assert stream_with_stops(smollm2, text, ["is Paris."])[:2] == ("The capital of France is Paris.", True)
    assert stream_with_stops(smollm2, text, ["aris. It"])[:2] == ("The capital of France is Paris. It", True)
    assert stream_with_stops(smollm2, "数学很难🙂好", ["难🙂"])[:2] == ("数学很难🙂", True)


def test_several_and_overlapping_stop_strings():
    assert run_stops(["world", "hello"], ["say hello world"]) == ("say hello", True)
    assert run_stops(["abcd", "bc"], ["xab", "cd"]) == ("xabc", True)   # the shorter one completes first
    assert run_stops(["aab"], list("aaab!")) == ("aaab", True)         # a failed partial match restarts inside
    assert run_stops(["abab"], ["aba", "bab"]) == ("abab", True)
    assert run_stops(["</s>", "\n\n"], ["line\n", "\nmore"]) == ("line\n\n", True)


def test_held_back_text_and_flush():
    matcher = StopMatcher(["hello", "help!"])
    assert matcher.feed("well hel") == ("well ", False)
    assert matcher.feed("p") == ("", False)
    assert matcher.feed("s") == ("helps", False)
    assert matcher.feed(" he") == (" ", False)
    assert matcher.flush() == "he"
    assert matcher.flush() == ""
    assert StopMatcher([]).feed("anything") == ("anything", False)
    assert StopMatcher(["", "x"]).feed("abc") == ("abc", False)


def test_nothing_after_a_stop():
    matcher = StopMatcher("END")
    assert matcher.feed("theEND and more") == ("theEND", True)
    assert matcher.feed("later") == ("", True)
    assert matcher.flush() == ""


def test_char_by_char_equals_all_at_once():
    rng = random.Random(7)
    for _ in range(300):
        text = "".join(rng.choice("ab🙂 ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab🙂 ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        expected = first_stop_reference(stops, text)
        assert run_stops(stops, [text]) == expected
        assert run_stops(stops, list(text)) == expected
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert run_stops(stops, chunks) == expected, (stops, chunks)
