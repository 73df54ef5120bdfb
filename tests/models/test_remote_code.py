"""Families LightLLM served through remote code (InternLM, InternLM2, Baichuan-7B / 13B, Baichuan 2, Qwen-1),
which no outside oracle runs: a random transformers model of the same architecture is written into the
family's tensor layout and config, and our logits must equal transformers' for the original (float32).
Baichuan-13B's oracle is a Llama with its rotary turned off and ALiBi added to the scores through the mask;
Baichuan 2's, a Llama whose head rows are unit vectors, stored scaled in the Baichuan 2 checkpoint.
Also: `--trust_remote_code` gates such directories, and an unsupported model_type is refused by the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from jaxllm import serve
from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache
from jaxllm.models.attention import AttentionMetadata
from jaxllm.models.baichuan import BAICHUAN2_VOCAB
from jaxllm.models.layers import alibi_slopes
from jaxllm.models.registry import SUPPORTED_MODEL_TYPES
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_hf

LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False)
AUTO_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
LENGTH = 29


def random_model(cls, config_cls, **fields):
    torch.manual_seed(1)
    config = config_cls(**fields)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1) if "norm" in name else p.normal_(0, 0.15)
    return model


def state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def layers(sd: dict, rename) -> dict[str, np.ndarray]:
    """Every per-layer tensor renamed by `rename(i, rest) -> {name: array}`; rest is the Llama name after the index."""
    out = {}
    for i in range(LLAMA["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        out.update(rename(i, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}))
    return out


def internlm(sd, raw):
    """InternLM (v1): Llama's names and layout with q/k/v/o biases, under its own model_type."""
    return dict(sd), {k: raw[k] for k in LLAMA} | dict(model_type="internlm", bias=True)


def internlm2(sd, raw):
    kv, g, d = 2, 2, 16

    def rename(i, t):
        q = t["self_attn.q_proj.weight"].reshape(kv, g, d, -1)
        k = t["self_attn.k_proj.weight"].reshape(kv, 1, d, -1)
        v = t["self_attn.v_proj.weight"].reshape(kv, 1, d, -1)
        p = f"model.layers.{i}."
        return {p + "attention.wqkv.weight": np.concatenate([q, k, v], axis=1).reshape(-1, q.shape[-1]),
                p + "attention.wo.weight": t["self_attn.o_proj.weight"],
                p + "feed_forward.w1.weight": t["mlp.gate_proj.weight"],
                p + "feed_forward.w3.weight": t["mlp.up_proj.weight"],
                p + "feed_forward.w2.weight": t["mlp.down_proj.weight"],
                p + "attention_norm.weight": t["input_layernorm.weight"],
                p + "ffn_norm.weight": t["post_attention_layernorm.weight"]}

    tensors = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"], **layers(sd, rename)}
    config = {k: raw[k] for k in LLAMA} | dict(model_type="internlm2", bias=False, rope_theta=10000.0)
    return tensors, config


def baichuan(sd, raw, alibi: bool, head_scales=None):
    def rename(i, t):
        p = f"model.layers.{i}."
        packed = np.concatenate([t[f"self_attn.{x}_proj.weight"] for x in "qkv"])
        rest = {p + k: v for k, v in t.items() if not k.startswith("self_attn.") or k.startswith("self_attn.o_proj")}
        return {p + "self_attn.W_pack.weight": packed, **rest}

    tensors = {k: v for k, v in sd.items() if not k.startswith("model.layers.")} | layers(sd, rename)
    if head_scales is not None:  # Baichuan 2 stores its head unnormalised: rows scaled, the oracle's are unit
        tensors["lm_head.weight"] = tensors["lm_head.weight"] * head_scales[:, None]
    config = {k: raw[k] for k in LLAMA} | dict(model_type="baichuan", num_key_value_heads=4,
                                               vocab_size=raw["vocab_size"])
    if alibi:  # the 13B configs: model_max_length instead of max_position_embeddings
        del config["max_position_embeddings"]
        config["model_max_length"] = 256
    return tensors, config


def qwen(sd, raw):
    def rename(i, t):
        p = f"transformer.h.{i}."
        return {p + "attn.c_attn.weight": np.concatenate([t[f"self_attn.{x}_proj.weight"] for x in "qkv"]),
                p + "attn.c_attn.bias": np.concatenate([t[f"self_attn.{x}_proj.bias"] for x in "qkv"]),
                p + "attn.c_proj.weight": t["self_attn.o_proj.weight"],
                p + "mlp.w2.weight": t["mlp.gate_proj.weight"], p + "mlp.w1.weight": t["mlp.up_proj.weight"],
                p + "mlp.c_proj.weight": t["mlp.down_proj.weight"], p + "ln_1.weight": t["input_layernorm.weight"],
                p + "ln_2.weight": t["post_attention_layernorm.weight"]}

    tensors = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
               "lm_head.weight": sd["lm_head.weight"], **layers(sd, rename)}
    config = dict(model_type="qwen", vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, kv_channels=16, layer_norm_epsilon=1e-5, rotary_emb_base=10000.0,
                  rotary_pct=1.0, seq_length=256, no_bias=True, use_dynamic_ntk=True, use_logn_attn=True)
    return tensors, config


def unit_rows_head(model):
    with torch.no_grad():
        model.lm_head.weight.div_(model.lm_head.weight.norm(dim=1, keepdim=True))
    return model


def alibi_mask(length: int, heads: int) -> torch.Tensor:
    """Causal mask plus ALiBi's slope × (key - query position), [1, heads, L, L]."""
    pos = torch.arange(length)
    distance = (pos[None, :] - pos[:, None]).float()
    bias = torch.tensor(alibi_slopes(heads))[:, None, None] * distance
    return torch.where(distance <= 0, bias, torch.tensor(float("-inf")))[None]


def oracle_logits(model, tokens, alibi: bool = False) -> np.ndarray:
    with torch.no_grad():
        if not alibi:
            return model(torch.tensor(tokens)[None]).logits[0].numpy()
        model.model.rotary_emb.inv_freq.zero_()  # no rotation: cos 1, sin 0
        model.model.rotary_emb.original_inv_freq.zero_()
        mask = alibi_mask(len(tokens), model.config.num_attention_heads)
        return model(torch.tensor(tokens)[None], attention_mask=mask).logits[0].numpy()


CASES = {  # name → (oracle class, config class, oracle fields, layout writer, ALiBi)
    "internlm": (transformers.LlamaForCausalLM, transformers.LlamaConfig, dict(attention_bias=True), internlm, False),
    "internlm2": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}, internlm2, False),
    "baichuan-7b": (transformers.LlamaForCausalLM, transformers.LlamaConfig, dict(num_key_value_heads=4),
                    lambda sd, raw: baichuan(sd, raw, alibi=False), False),
    "baichuan-13b": (transformers.LlamaForCausalLM, transformers.LlamaConfig, dict(num_key_value_heads=4),
                     lambda sd, raw: baichuan(sd, raw, alibi=True), True),
    "baichuan2-7b": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                     dict(num_key_value_heads=4, vocab_size=BAICHUAN2_VOCAB),
                     lambda sd, raw: baichuan(sd, raw, alibi=False,
                                              head_scales=np.linspace(0.5, 3.0, BAICHUAN2_VOCAB, dtype=np.float32)),
                     False),
    "qwen": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, dict(num_key_value_heads=4), qwen, False),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def remote_family(request, tmp_path_factory):
    cls, config_cls, fields, write, alibi = CASES[request.param]
    raw = LLAMA | fields
    model = random_model(cls, config_cls, **raw)
    if raw["vocab_size"] == BAICHUAN2_VOCAB:
        unit_rows_head(model)
    tensors, config = write(state(model), raw)
    path = tmp_path_factory.mktemp(request.param)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config | {"auto_map": AUTO_MAP}))
    tokens = np.random.default_rng(0).integers(0, 256, size=LENGTH)  # (Baichuan 2's vocabulary is larger)
    return request.param, path, tokens, oracle_logits(model, tokens, alibi)


SHARDED = ("internlm2", "baichuan-13b")  # also at tp 2: KV-group packing, and ALiBi slopes split with the heads


def test_layout_gives_the_original_models_logits(remote_family):
    name, path, tokens, expected = remote_family
    config = ModelConfig.from_model_dir(path, trust_remote_code=True)
    model = build_model(config, jnp.float32)
    meta = AttentionMetadata.for_sequences([(0, LENGTH)], [list(range(LENGTH))], scratch_slot=32, width=32)
    for tp in (1, 2) if name in SHARDED else (1,):
        params = load_hf(model, path, make_mesh(tp), tp)
        step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))
        logits, _ = step(params, jnp.asarray(tokens, jnp.int32), meta, init_kv_cache(model, 32))
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0, err_msg=f"tp {tp}")


def test_remote_code_needs_the_flag(remote_family):
    _, path, _, _ = remote_family
    with pytest.raises(ValueError, match=rf"{path}.*--trust_remote_code"):
        ModelConfig.from_model_dir(path)


def test_cli_refuses_remote_code_without_the_flag(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, model_type="internlm2", auto_map=AUTO_MAP)))
    assert serve.main(["--model_dir", str(tmp_path), "--load_format", "dummy"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "--trust_remote_code" in err


def test_cli_refuses_an_unsupported_model_type_listing_the_supported_ones(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, model_type="mamba")))
    assert serve.main(["--model_dir", str(tmp_path), "--load_format", "dummy"]) == 2
    err = capsys.readouterr().err
    assert "'mamba' is not supported" in err
    assert all(t in err for t in SUPPORTED_MODEL_TYPES) and "gemma2" in err and "internlm2" in err


def test_qwen_refuses_requests_past_its_seq_length(tmp_path, capsys):
    """Qwen-1's logn attention and dynamic NTK (past seq_length) are not built: longer requests are refused."""
    raw = dict(model_type="qwen", vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, seq_length=256, use_logn_attn=True, use_dynamic_ntk=True)
    config = ModelConfig.from_hf_dict(raw)
    config.check_context(256)
    with pytest.raises(ValueError, match="--max_req_total_len 257 passes the 256 positions"):
        config.check_context(257)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert serve.main(["--model_dir", str(tmp_path), "--load_format", "dummy", "--max_req_input_len", "300",
                       "--max_req_total_len", "400"]) == 2
    assert "--max_req_total_len 400 passes the 256 positions" in capsys.readouterr().err
