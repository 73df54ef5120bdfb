"""`python -m jaxllm.bench.experts --smoke`: the grouped-matmul benchmark's implementations agree on the CPU."""

from jaxllm.bench import experts


def test_smoke_implementations_agree(capsys):
    assert experts.main(["--smoke"]) == 0
    assert "5 tokens: dense_loop, gathered and sliced agree with ragged_dot" in capsys.readouterr().out
