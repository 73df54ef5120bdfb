"""The routes' prompt encoder: the ids of tokenizer.encode, batched on a worker thread."""

import asyncio
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from jaxllm.server.prompt_encoder import PromptEncoder, rust_copy


def _texts(tokenizer, count: int, seed: int) -> list[str]:
    """Random token runs decoded (every kind of piece the vocabulary has), some with special tokens inside."""
    rng = random.Random(seed)
    texts = [tokenizer.decode([rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))])
             for _ in range(count)]
    specials = tokenizer.all_special_tokens
    return texts + [f"{t[:5]}{rng.choice(specials)} {t[5:]}" for t in texts[: count // 4]]


def _bos_tokenizer(truncate_at: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose post-processor adds a BOS token; its Rust tokenizer truncates if asked."""
    vocab = {"<s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate("the cat sat on a mat".split())}}
    rust = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    if truncate_at is not None:
        rust.enable_truncation(truncate_at)
    return PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", unk_token="<unk>")


def test_rust_copy_encodes_as_transformers(tokenizer):
    copy = rust_copy(tokenizer)
    assert copy is not None
    for text in _texts(tokenizer, 40, seed=1):
        for add in (True, False):
            assert copy.encode_batch([text], add_special_tokens=add)[0].ids == tokenizer.encode(
                text, add_special_tokens=add), (text, add)


def test_special_tokens_added_and_no_truncation_inherited():
    tok = _bos_tokenizer(truncate_at=3)
    encoder = PromptEncoder(tok)
    assert encoder.backend is not None
    text = "the cat sat on a mat the cat"
    ids = asyncio.run(encoder.encode(text))
    assert ids == tok.encode(text) and ids[0] == 0 and len(ids) == 9
    assert asyncio.run(encoder.encode(text, False)) == tok.encode(text, add_special_tokens=False) == ids[1:]


def test_a_burst_is_encoded_in_few_batches(tokenizer):
    encoder = PromptEncoder(tokenizer)
    batches = []
    encode = encoder._encode
    encoder._encode = lambda prompts: batches.append(len(prompts)) or encode(prompts)
    texts = _texts(tokenizer, 64, seed=2)
    adds = [i % 3 != 0 for i in range(len(texts))]

    async def burst():
        return await asyncio.gather(*(encoder.encode(t, a) for t, a in zip(texts, adds)))

    got = asyncio.run(burst())
    assert got == [tokenizer.encode(t, add_special_tokens=a) for t, a in zip(texts, adds)]
    assert sum(batches) == len(texts) and len(batches) <= 3, batches  # the first alone, then the rest together


def test_a_cancelled_waiter_leaves_the_others_their_ids(tokenizer):
    encoder = PromptEncoder(tokenizer)
    texts = _texts(tokenizer, 8, seed=3)

    async def run():
        tasks = [asyncio.ensure_future(encoder.encode(t)) for t in texts]
        await asyncio.sleep(0)
        tasks[3].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    got = asyncio.run(run())
    assert isinstance(got[3], asyncio.CancelledError)
    assert [g for i, g in enumerate(got) if i != 3] == [tokenizer.encode(t) for i, t in enumerate(texts) if i != 3]
    assert asyncio.run(encoder.encode(texts[0])) == tokenizer.encode(texts[0])  # and the encoder still works


class _OwnEncode(PreTrainedTokenizerFast):
    def encode(self, text, add_special_tokens=True, **kwargs):  # a class that changes the encode path
        return [7] + super().encode(text, add_special_tokens=add_special_tokens, **kwargs)


@pytest.mark.parametrize("make", [lambda: _OwnEncode(tokenizer_object=_bos_tokenizer().backend_tokenizer),
                                  lambda: None], ids=["own-encode", "no-tokenizer"])
def test_other_tokenizers_are_called_as_before(make):
    tok = make()
    encoder = PromptEncoder(tok)
    assert encoder.backend is None
    if tok is not None:
        assert asyncio.run(encoder.encode("the mat")) == tok.encode("the mat") == [7, 0, 2, 7]
