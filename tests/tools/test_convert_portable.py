"""Converted model directories load in transformers 4.x and 5.x alike: the rewriting rules of
tools.convert.portable, and the converted SmolLM2 and a converted transformers-5-saved checkpoint read under the
transformers 4.x venv (`make install-test` creates it) give the same config, token ids, texts and chat prompt
as under transformers 5."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from transformers_probe import describe

from tools.convert import convert
from tools.convert.portable import portable_config, portable_tokenizer_config

REPO = Path(__file__).resolve().parents[2]
TF4_VENV = REPO / ".venv-transformers4"
TF4_ENV = "JAXLLM_TRANSFORMERS4_PYTHON"  # set by `make test`: there the venv must exist
PROBE = Path(__file__).resolve().parent / "transformers_probe.py"
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
EXTRA_SPECIAL = ["<tool_call>", "</tool_call>"]


def test_rope_parameters_are_also_written_in_transformers_4_keys():
    config = {"model_type": "llama", "rope_parameters": LLAMA3_ROPE}
    out = portable_config(config)
    assert out["rope_theta"] == 500000.0 and out["rope_parameters"] == LLAMA3_ROPE
    assert out["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert config == {"model_type": "llama", "rope_parameters": LLAMA3_ROPE}  # the input is left alone

    default = portable_config({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                   "partial_rotary_factor": 0.5}, "rope_scaling": None})
    assert (default["rope_theta"], default["partial_rotary_factor"], default["rope_scaling"]) == (1e6, 0.5, None)

    per_layer_type = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    assert portable_config(per_layer_type) == per_layer_type  # Gemma 3's form has no 4.x spelling
    assert portable_config({"rope_theta": 1e4}) == {"rope_theta": 1e4}


def test_tokenizer_config_names_a_class_both_versions_have():
    saved_by_5 = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "is_local": True,
                  "local_files_only": False, "extra_special_tokens": ["<a>", "<b>"],
                  "additional_special_tokens": ["<b>", "<c>"], "eos_token": "</s>"}
    out = portable_tokenizer_config(saved_by_5, has_tokenizer_json=True)
    assert out == {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers", "eos_token": "</s>",
                   "additional_special_tokens": ["<b>", "<c>", "<a>"]}
    # Without tokenizer.json there is nothing PreTrainedTokenizerFast could load: the class stays.
    assert portable_tokenizer_config(saved_by_5, has_tokenizer_json=False)["tokenizer_class"] == "TokenizersBackend"
    named = {"tokenizer_class": "GPT2Tokenizer", "extra_special_tokens": {"image_token": "<img>"}}
    assert portable_tokenizer_config(named, has_tokenizer_json=True) == named  # 4.x's dict form is kept


@pytest.fixture(scope="module")
def saved_by_transformers_5(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with Llama-3 rope scaling, saved by transformers 5 beside SmolLM2's tokenizer with
    two extra special tokens (so: rope_parameters, TokenizersBackend, an extra_special_tokens list and the
    chat template in chat_template.jinja only)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = tmp_path_factory.mktemp("saved_by_transformers_5")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL})
    tokenizer.save_pretrained(src)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_parameters=dict(LLAMA3_ROPE), bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(src)
    saved = json.loads((src / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "TokenizersBackend" and saved["extra_special_tokens"] == EXTRA_SPECIAL
    assert "rope_theta" not in json.loads((src / "config.json").read_text())  # what 4.x cannot read
    return src


@pytest.fixture(scope="module")
def converted_from_transformers_5(saved_by_transformers_5, tmp_path_factory) -> Path:
    return convert(saved_by_transformers_5, tmp_path_factory.mktemp("converted") / "out", dtype="bfloat16")


def test_converted_directories_carry_both_versions_keys(smollm2_dir, converted_from_transformers_5):
    assert json.loads((smollm2_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    dst = converted_from_transformers_5
    config = json.loads((dst / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    tokenizer_config = json.loads((dst / "tokenizer_config.json").read_text())
    assert tokenizer_config["additional_special_tokens"] == EXTRA_SPECIAL
    assert "extra_special_tokens" not in tokenizer_config and "chat_template" in tokenizer_config
    assert json.loads((dst / "special_tokens_map.json").read_text())["additional_special_tokens"] == EXTRA_SPECIAL


def test_conversion_changes_nothing_transformers_5_reads(saved_by_transformers_5, converted_from_transformers_5):
    assert describe(str(converted_from_transformers_5)) == describe(str(saved_by_transformers_5))


def transformers4_python() -> Path:
    """The transformers 4.x venv's python: a failure under `make test` when missing, a skip outside it."""
    configured = os.environ.get(TF4_ENV)
    python = REPO / configured if configured else TF4_VENV / "bin" / "python"
    if not python.exists():
        if configured:
            pytest.fail(f"{TF4_ENV}={configured}: no such python (make install-test creates {TF4_VENV.name})")
        pytest.skip(f"no transformers 4.x venv at {TF4_VENV} (`make install-test` creates it)")
    return python


def test_transformers_4_reads_what_transformers_5_reads(smollm2_dir, converted_from_transformers_5):
    dirs = [str(smollm2_dir), str(converted_from_transformers_5)]
    done = subprocess.run([str(transformers4_python()), str(PROBE), *dirs], capture_output=True, text=True,
                          timeout=300, cwd=PROBE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    under_4 = json.loads(done.stdout)
    assert under_4["version"].startswith("4.")
    for model_dir, seen_by_4 in zip(dirs, under_4["dirs"]):
        seen_by_5 = describe(model_dir)
        assert seen_by_5["chat"] is not None and seen_by_5["config"]["rope"]["rope_theta"] > 10000.0
        for key in seen_by_5:
            assert seen_by_4[key] == seen_by_5[key], f"{model_dir}: {key}"
