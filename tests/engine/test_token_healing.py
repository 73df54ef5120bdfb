"""Token healing's prefix index (SmolLM2's vocabulary) against a scan of the vocabulary; the healing constraint
step by step. The greedy continuations against transformers are in tests/e2e/test_e2e_token_healing.py."""

import numpy as np
import pytest

from jaxllm.engine.token_healing import TokenHealer, VocabularyIndex


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def index(tokenizer):
    return VocabularyIndex(tokenizer, len(tokenizer))


def token_text(tokenizer, t):
    return tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_the_prefix_index_finds_what_a_scan_of_the_vocabulary_finds(tokenizer, index):
    special = set(tokenizer.all_special_ids)
    texts = {t: token_text(tokenizer, t) for t in range(len(tokenizer)) if t not in special}
    for removed in ["Fra", " https:", "://", " >", "_aver", "e"]:
        scanned = {t for t, s in texts.items() if s and "\ufffd" not in s
                   and (s.startswith(removed) or removed.startswith(s))}
        assert set(index.consistent_with(removed).tolist()) == scanned


def test_a_prompt_is_backed_up_and_its_text_covered_again(tokenizer):
    healer = TokenHealer(tokenizer, len(tokenizer))
    ids = tokenizer.encode("Visit https:")
    prompt, healing = healer.heal(ids)
    assert prompt == ids[:-2] and healing.backed_up == 2 and healing.active
    removed = healing.remaining
    assert removed == tokenizer.decode(ids[-2:])
    row = np.zeros((len(tokenizer) + 31) // 32, np.int32)
    healing.fill(row)
    allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
    assert set(allowed.tolist()) == set(healer.index.consistent_with(removed).tolist())
    first = ids[-2]  # the original token: a prefix of the removed text
    healing.advance(first)
    assert healing.active and healing.tokens_within_prompt == 1
    longer = next(t for t in healer.index.consistent_with(healing.remaining).tolist()
                  if len(healer.index.text_of[t]) > len(healing.remaining))
    healing.advance(longer)
    assert not healing.active and healing.tokens_within_prompt == 1
    text = tokenizer.decode([first]) + healer.index.text_of[longer]
    assert healing.skip_prompt_text(text) == text[len(removed):]
    with pytest.raises(ValueError):
        TokenHealer(tokenizer, len(tokenizer)).heal(ids)[1].advance(tokenizer.encode(" zebra")[0])
