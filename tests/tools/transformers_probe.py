"""What transformers (4.x or 5.x, whichever imports) reads from a model directory: its config's fields and its
tokenizer's ids, texts and special tokens, as plain JSON. Imports transformers only, so that
`python transformers_probe.py DIR...` also runs under the transformers 4.x venv (`make install-test`)."""

from __future__ import annotations

import json
import sys

TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "héllo wörld ünïcode 你好 🙂 ½",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a\n\n\tb  c   d",
    "def f(x):\n    return x ** 2  # don't",
    "1234567890 3.14159 x+y=z",
]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
_CONFIG_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)


def _rope(config) -> dict:
    """The rope parameters in 5.x's form (4.x keeps them in rope_theta and rope_scaling)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return dict(config.rope_parameters)
    return {**(config.rope_scaling or {"rope_type": "default"}), "rope_theta": config.rope_theta}


def describe(model_dir: str) -> dict:
    """The config fields and the tokenizer's behaviour on TEXTS and CONVERSATION, as JSON values."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    described = {
        "config": {**{k: getattr(config, k, None) for k in _CONFIG_FIELDS}, "rope": _rope(config)},
        "ids": ids,
        "tokens": [tokenizer.convert_ids_to_tokens(i) for i in ids],
        "decoded": [tokenizer.decode(i) for i in ids],
        "decoded_skipping_special": [tokenizer.decode(i, skip_special_tokens=True) for i in ids],
        "special_tokens": {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token",
                                                                       "pad_token")},
        "all_special_ids": sorted(tokenizer.all_special_ids),
        "size": len(tokenizer),
        "chat": None,
    }
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
        described["chat"] = {"text": text, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
    return described


def main(model_dirs: list[str]) -> None:
    import transformers

    print(json.dumps({"version": transformers.__version__, "dirs": [describe(d) for d in model_dirs]}))


if __name__ == "__main__":
    main(sys.argv[1:])
