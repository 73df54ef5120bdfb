"""XLA options from the weights: w8a8 sends the int8 products to cuBLAS, unless the user chose otherwise or the
backend has started (XLA reads its flags once)."""

import pytest

from jaxllm import xla_options
from jaxllm.models.quant import WeightQuant


@pytest.fixture
def fresh_backend(monkeypatch):
    monkeypatch.setattr(xla_options.xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")


def test_w8a8_adds_the_flag_to_the_users_flags(fresh_backend, monkeypatch):
    assert xla_options.for_weights(WeightQuant("w8a8")) == "--xla_gpu_enable_triton_gemm=false"
    assert xla_options.os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                                           "--xla_gpu_enable_triton_gemm=false"]


@pytest.mark.parametrize("scheme", [None, "w8a16", "w4a16", "fp8_w8a8"])
def test_other_weights_ask_nothing(fresh_backend, scheme):
    assert xla_options.for_weights(scheme and WeightQuant(scheme)) is None
    assert xla_options.os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_the_users_choice_stands(fresh_backend, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    assert xla_options.for_weights(WeightQuant("w8a8")) is None
    assert xla_options.os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"


def test_a_started_backend_is_left_alone_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(xla_options.xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with caplog.at_level("INFO", logger="jaxllm.xla_options"):
        assert xla_options.for_weights(WeightQuant("w8a8")) is None
    assert "XLA_FLAGS" not in xla_options.os.environ and "cuBLAS" in caplog.text


def test_the_weights_come_from_the_flags_or_the_checkpoints_config(tmp_path):
    """Before the backend starts: --mode's scheme, else config.json's quantization_config, else None."""
    import json
    from types import SimpleNamespace

    from jaxllm.models.quant import QUANT_METHOD

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": QUANT_METHOD, "scheme": "w8a8"}}))
    assert xla_options.weights_of(SimpleNamespace(mode=["triton_gqa_flashdecoding", "ppl_w8a8_mixdown"],
                                                  model_dir=None)).scheme == "w8a8"
    assert xla_options.weights_of(SimpleNamespace(mode=["triton_int8kv"], model_dir=str(tmp_path))).scheme == "w8a8"
    assert xla_options.weights_of(SimpleNamespace(mode=[], model_dir=str(tmp_path / "missing"))) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert xla_options.weights_of(SimpleNamespace(mode=[], model_dir=str(tmp_path))) is None
