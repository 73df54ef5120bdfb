"""tools.convert: HF → HF (dtype cast, shards), HF → orbax, GGUF → HF, each checked by logits against
transformers; the CLI's one-line errors; the default model's convert-once stamp."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from tiny_checkpoints import (
    CHAT_TEMPLATE,
    PROMPT,
    jaxllm_logits,
    llama_cpp_permute,
    save_tiny_llama,
    transformers_logits,
    write_tiny_gguf,
)

from jaxllm.weights import read_safetensors
from tools.convert import ConvertError, convert
from tools.convert.__main__ import main
from tools.convert.default_model import STAMP_FILE, is_fresh, prepare_default_model
from tools.convert.gguf_import import unpermute_rotary_rows

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(directory, torch model) of a random untied Llama saved with safetensors."""
    src = tmp_path_factory.mktemp("tiny_hf")
    return src, save_tiny_llama(src, tie=False)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, torch model) of a random tied Llama stored as llama.cpp would (Q8_0 MLP)."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    model = save_tiny_llama(root / "hf", tie=True, seed=1)
    path = root / "tiny.gguf"
    write_tiny_gguf(path, model)
    return path, model


def _safetensors_dtypes(model_dir: Path) -> set[str]:
    dtypes = set()
    for file in model_dir.glob("*.safetensors"):
        raw = file.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        dtypes |= {info["dtype"] for name, info in header.items() if name != "__metadata__"}
    return dtypes


def test_unpermute_inverts_llama_cpp_row_order():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of head_dim 8
    permuted = llama_cpp_permute(weight, 3)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, 3), weight)


def test_hf_to_hf_float32_matches_transformers(tiny_hf, tmp_path):
    src, torch_model = tiny_hf
    dst = convert(src, tmp_path / "out")
    assert (dst / "model.safetensors").is_file()
    assert _safetensors_dtypes(dst) == {"F32"}
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float32"
    expected = transformers_logits(torch_model, PROMPT)
    assert np.abs(expected).max() > 0.5  # weights large enough for the tolerance to bite
    np.testing.assert_allclose(jaxllm_logits(dst, PROMPT), expected, rtol=0, atol=TOLERANCE)


def test_hf_to_hf_bfloat16_casts_and_matches_rounded_transformers(tiny_hf, tmp_path):
    import torch

    src, torch_model = tiny_hf
    dst = convert(src, tmp_path / "out", dtype="bfloat16")
    assert _safetensors_dtypes(dst) == {"BF16"}
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    rounded = type(torch_model)(torch_model.config).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in torch_model.state_dict().items()})
    expected = transformers_logits(rounded, PROMPT)
    assert np.abs(expected - transformers_logits(torch_model, PROMPT)).max() > TOLERANCE  # the cast shows
    np.testing.assert_allclose(jaxllm_logits(dst, PROMPT), expected, rtol=0, atol=TOLERANCE)


def test_hf_to_hf_shards_with_index(tiny_hf, tmp_path):
    src, torch_model = tiny_hf
    dst = convert(src, tmp_path / "out", max_shard_bytes=64 * 1024)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(dst.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (dst / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    stored = {}
    for shard in shards:
        stored.update(read_safetensors(shard))
    source = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert set(stored) == set(source)
    for name, value in source.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in source.values())


def test_hf_to_orbax_restores_on_any_mesh(tiny_hf, tmp_path):
    src, torch_model = tiny_hf
    dst = convert(src, tmp_path / "out", fmt="orbax", tp=2)
    assert (dst / "orbax").is_dir() and (dst / "config.json").is_file()
    assert not list(dst.glob("*.safetensors")) and not (dst / "_safetensors").exists()
    expected = transformers_logits(torch_model, PROMPT)
    for tp in (1, 2):
        np.testing.assert_allclose(jaxllm_logits(dst, PROMPT, tp=tp), expected, rtol=0, atol=TOLERANCE)


def test_gguf_to_hf_matches_transformers_gguf_loading(tiny_gguf, tmp_path):
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, torch_model = tiny_gguf
    dst = convert(path, tmp_path / "out")
    config = json.loads((dst / "config.json").read_text())
    c = torch_model.config
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == c.vocab_size
    assert (config["num_key_value_heads"], config["head_dim"], config["rms_norm_eps"]) == (2, 16, 1e-5)
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == 2

    stored = read_safetensors(dst / "model.safetensors")
    assert "lm_head.weight" not in stored
    q8 = GGMLQuantizationType.Q8_0
    for name, value in torch_model.state_dict().items():
        if name == "lm_head.weight":
            continue
        source = value.numpy()
        expected = dequantize(quantize(source, q8), q8) if ".mlp." in name else source
        np.testing.assert_array_equal(stored[name], expected, err_msg=name)

    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    np.testing.assert_allclose(
        jaxllm_logits(dst, PROMPT), transformers_logits(reference, PROMPT), rtol=0, atol=TOLERANCE
    )

    tokenizer_config = json.loads((dst / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert json.loads((dst / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"
    tokenizer = AutoTokenizer.from_pretrained(dst)
    messages = [{"role": "user", "content": "hell"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhell<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(text)["input_ids"][:1] == [1]  # <|im_start|> is one special token, no BOS added
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello")["input_ids"]) == ["hell", "o"]


def _run_cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_missing_source_is_one_line_exit_2(tmp_path, capsys):
    code, err = _run_cli(["--src", tmp_path / "absent", "--dst", tmp_path / "out"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_cli_unsupported_architecture_exit_2(tiny_hf, tiny_gguf, tmp_path, capsys):
    hf_src = tmp_path / "gpt2"
    hf_src.mkdir()
    (hf_src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    code, err = _run_cli(["--src", hf_src, "--dst", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "gpt2" in err

    gguf_path = tmp_path / "falcon.gguf"
    write_tiny_gguf(gguf_path, tiny_gguf[1], architecture="falcon", quantize_mlp=False)
    code, err = _run_cli(["--src", gguf_path, "--dst", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "falcon" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_non_empty_destination_without_force(tiny_hf, tmp_path, capsys):
    src, _ = tiny_hf
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    code, err = _run_cli(["--src", src, "--dst", dst], capsys)
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    code, err = _run_cli(["--src", src, "--dst", dst, "--force"], capsys)
    assert code == 2 and "no config.json" in err  # --force replaces model directories only
    assert (dst / "notes.txt").read_text() == "keep me"


def test_cli_force_replaces_a_model_directory(tiny_hf, tmp_path, capsys):
    src, _ = tiny_hf
    dst = tmp_path / "out"
    assert _run_cli(["--src", src, "--dst", dst, "--dtype", "float16"], capsys)[0] == 0
    assert _safetensors_dtypes(dst) == {"F16"}
    assert _run_cli(["--src", src, "--dst", dst, "--dtype", "bfloat16", "--force"], capsys)[0] == 0
    assert _safetensors_dtypes(dst) == {"BF16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copies left


def test_cli_tp_must_divide_heads(tiny_hf, tmp_path, capsys):
    src, _ = tiny_hf
    code, err = _run_cli(["--src", src, "--dst", tmp_path / "out", "--tp", "3"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--tp 3" in err


def test_default_model_converts_once_and_again_when_stale(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    gguf = tmp_path / path.name
    gguf.write_bytes(path.read_bytes())
    dst = tmp_path / "model"
    assert not is_fresh(dst, gguf)
    prepare_default_model(dst, gguf)
    assert is_fresh(dst, gguf) and (dst / STAMP_FILE).is_file()
    weights = dst / "model.safetensors"
    first = weights.stat().st_ino
    prepare_default_model(dst, gguf)
    assert weights.stat().st_ino == first  # reused, not rewritten

    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not is_fresh(dst, gguf)
    prepare_default_model(dst, gguf)
    assert is_fresh(dst, gguf) and weights.stat().st_ino != first


def test_convert_error_for_unknown_dtype(tiny_hf, tmp_path):
    with pytest.raises(ConvertError, match="float8"):
        convert(tiny_hf[0], tmp_path / "out", dtype="float8")


def test_hf_source_tokenizer_is_copied_and_completed(tiny_gguf, tmp_path):
    first = convert(tiny_gguf[0], tmp_path / "first")
    tokenizer_config = json.loads((first / "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]  # as transformers 5 saves it: the template in chat_template.jinja only
    (first / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (first / "special_tokens_map.json").unlink()

    second = convert(first, tmp_path / "second", dtype="bfloat16")
    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert json.loads((second / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    special = json.loads((second / "special_tokens_map.json").read_text())
    assert (special["bos_token"], special["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert json.loads((second / "generation_config.json").read_text())["bos_token_id"] == 1


@pytest.mark.parametrize("scheme", ["w4a16", "w8a8"])
def test_quantised_conversion_loads_without_requantising(tiny_hf, tmp_path, scheme):
    """`--quant`: an orbax directory whose config.json names the scheme; it loads as quantised params and gives
    the logits of quantising at load (`--mode`)."""
    import dataclasses

    import jax.numpy as jnp

    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model, quant
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import load_hf, load_params

    src, _ = tiny_hf
    assert main(["--src", str(src), "--dst", str(tmp_path / "out"), "--quant", scheme]) == 0
    dst = tmp_path / "out"
    config = ModelConfig.from_model_dir(dst)
    assert config.weight_quant == quant.WeightQuant(scheme)
    restored = load_params(build_model(config, jnp.float32), dst, make_mesh(1), 1)
    at_load = load_hf(build_model(dataclasses.replace(ModelConfig.from_model_dir(src), weight_quant=config.weight_quant),
                                  jnp.float32), src, make_mesh(1), 1)
    down = restored["layers_1"]["mlp"]["down_proj"]
    assert isinstance(down, quant.Int4Weight if scheme == "w4a16" else quant.Int8Weight)
    for a, b in zip(jax_leaves(restored), jax_leaves(at_load)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if scheme == "w8a8":
        np.testing.assert_allclose(jaxllm_logits(dst, PROMPT), jaxllm_logits(dst, PROMPT, tp=2), rtol=0,
                                   atol=TOLERANCE)
    else:  # intermediate 128: one group of 128 along the down-projection's input cannot be split in two
        with pytest.raises(ValueError, match="layers_0/mlp/down_proj.* cannot be split over --tp 2"):
            jaxllm_logits(dst, PROMPT, tp=2)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
