"""`jaxllm.bench offline --score`: the same prompts prefilled on the causal LM (one new token each), then scored
on its config with a random one-label head; both runs count the same input tokens."""

import json

from jaxllm.bench.__main__ import main
from tests.engine.engine_helpers import TINY_CONFIG

FLAGS = ["--load_format", "dummy", "--data_type", "float32", "--max_total_token_num", "512", "--max_req_input_len",
         "40", "--max_req_total_len", "64", "--running_max_req_size", "8", "--batch_max_tokens", "64"]


def test_score_against_prefill(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_CONFIG, vocab_size=32000)))  # the workload's ids
    out = tmp_path / "result.json"
    argv = ["offline", "--model_dir", str(tmp_path), "--score", "--num-prompts", "5", "--input-len", "20",
            "--input-len-max", "30", "--warmup", "0", "--result-json", str(out), *FLAGS]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    prefill, score = result["prefill"], result["score"]
    assert not prefill["scored"] and score["scored"]
    assert prefill["completed"] == score["completed"] == 5
    assert prefill["total_input_tokens"] == score["total_input_tokens"] >= 100
    assert prefill["total_output_tokens"] == 5 and score["total_output_tokens"] == 0
    assert result["score_over_prefill"] > 0
    assert "scoring speed / prefill speed" in capsys.readouterr().out
