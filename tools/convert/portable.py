"""Model directories that transformers 4.x and 5.x both read: what 5.x saves in its own terms (config.json's
`rope_parameters`, tokenizer_config.json's `TokenizersBackend` class and `extra_special_tokens` list) is also
written in the keys 4.x reads, and the tokenizer files are made self-contained for older readers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# transformers 5's class for "tokenizer.json as it is" → 4.x's class that does the same, adding nothing.
_PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# transformers 5 classes with no 4.x counterpart that reads the same files.
_V5_ONLY_CLASSES = ("TokenizersBackend", "SentencePieceBackend", "PythonBackend", "MistralCommonBackend")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_LOAD_TIME_KEYS = ("is_local", "local_files_only")  # transformers records how it loaded, not what it is
# Keys of a flat `rope_parameters` that 4.x reads at the top level of config.json.
_TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json whose `rope_parameters` (5.x) is also spelled as `rope_theta`, `partial_rotary_factor` and
    `rope_scaling` (4.x, which otherwise falls back to its defaults in silence: theta 10000, no scaling).
    Per-layer-type rope parameters (Gemma 3) have no 4.x spelling and are left as they are."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or not ({"rope_type", "rope_theta"} & params.keys()):
        return config
    out = dict(config)
    for key in _TOP_LEVEL_ROPE_KEYS:
        if key in params and out.get(key) is None:
            out[key] = params[key]
    scaling = {k: v for k, v in params.items() if k not in _TOP_LEVEL_ROPE_KEYS}
    if scaling.get("rope_type", "default") != "default" and out.get("rope_scaling") is None:
        out["rope_scaling"] = scaling
    return out


def portable_tokenizer_config(config: dict[str, Any], has_tokenizer_json: bool) -> dict[str, Any]:
    """tokenizer_config.json in keys both versions read: 5.x's `TokenizersBackend` named as 4.x's
    `PreTrainedTokenizerFast` (both load tokenizer.json as it is), 5.x's `extra_special_tokens` list (4.x wants
    a dict there) moved to `additional_special_tokens`, and the load-time keys dropped."""
    out = {k: v for k, v in config.items() if k not in _LOAD_TIME_KEYS}
    tokenizer_class = out.get("tokenizer_class")
    if tokenizer_class in _PORTABLE_CLASSES and has_tokenizer_json:
        out["tokenizer_class"] = _PORTABLE_CLASSES[tokenizer_class]
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        additional = list(out.get("additional_special_tokens") or [])
        additional += [token for token in extra if token not in additional]
        if additional:
            out["additional_special_tokens"] = additional
    return out


def make_tokenizer_portable(model_dir: Path) -> None:
    """Rewrite the tokenizer files in `model_dir` for transformers 4.x and 5.x alike: tokenizer_config.json in
    keys both read, the chat template also inside it (5.x keeps it in chat_template.jinja only) and a
    special_tokens_map.json, which older readers expect. Warns when the tokenizer class stays 5.x-only."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config = portable_tokenizer_config(config, has_tokenizer_json=(model_dir / "tokenizer.json").is_file())
    template_path = model_dir / "chat_template.jinja"
    if "chat_template" not in config and template_path.is_file():
        config["chat_template"] = template_path.read_text()
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_path = model_dir / "special_tokens_map.json"
    if not special_path.is_file():
        special = {key: config[key] for key in _SPECIAL_TOKENS if config.get(key) is not None}
        if config.get("additional_special_tokens"):
            special["additional_special_tokens"] = config["additional_special_tokens"]
        special_path.write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    if config.get("tokenizer_class") in _V5_ONLY_CLASSES:
        print(f"warning: tokenizer class {config['tokenizer_class']} is transformers 5's only; transformers 4.x "
              "cannot load this tokenizer", file=sys.stderr)
