"""The serving benchmark client (`python -m jaxllm.bench serve`) against the real server, both APIs."""

import json

import pytest

from jaxllm.bench.__main__ import main


@pytest.mark.parametrize("api, processes", [("lightllm", 1), ("openai", 1), ("lightllm", 2)],
                         ids=["lightllm", "openai", "lightllm-two-client-processes"])
def test_bench_serve_measures_every_request(lightllm_server, smollm2_dir, tmp_path, api, processes, capsys):
    result_path = tmp_path / "result.json"
    code = main([
        "serve", "--base-url", lightllm_server.base, "--api", api, "--tokenizer", str(smollm2_dir),
        "--num-prompts", "6", "--input-len", "12", "--output-len", "5", "--request-rate", "20",
        "--seed", "1", "--client-processes", str(processes), "--result-json", str(result_path),
    ])
    assert code == 0
    result = json.loads(result_path.read_text())
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["total_output_tokens"] == 6 * 5  # ignore_eos: exactly the requested lengths
    assert result["total_input_tokens"] >= 6 * 5  # decoded random ids re-tokenize to a similar length
    assert 0 < result["ttft_ms"]["median"] <= result["e2el_ms"]["median"]
    assert result["tpot_ms"]["mean"] > 0 and result["itl_ms"]["p99"] > 0
    assert "TTFT" in capsys.readouterr().out
    status, load = lightllm_server.get("/token_load")
    assert status == 200 and load["current_load"] == 0


def test_bench_serve_sends_json_schema_requests(lightllm_server, smollm2_dir, tmp_path):
    """--json-schema: every request constrained (guided_json); the records schema outlasts the output length."""
    from pathlib import Path

    import jaxllm.bench

    schema = Path(jaxllm.bench.__file__).parent / "schemas" / "records.json"
    result_path = tmp_path / "result.json"
    code = main(["serve", "--base-url", lightllm_server.base, "--tokenizer", str(smollm2_dir), "--num-prompts", "4",
                 "--input-len", "12", "--output-len", "6", "--json-schema", str(schema),
                 "--result-json", str(result_path)])
    result = json.loads(result_path.read_text())
    assert code == 0 and (result["completed"], result["failed"]) == (4, 0)
    assert result["total_output_tokens"] == 4 * 6
