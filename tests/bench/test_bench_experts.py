"""`python -m jaxllm.bench.experts --smoke`: the grouped-matmul benchmark's implementations, and its two placements of
experts on 2 devices, agree on the CPU."""

from jaxllm.bench import experts


def test_smoke_implementations_agree(capsys):
    assert experts.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "5 tokens: dense_loop, gathered, sliced and pallas agree with ragged_dot" in out
    assert "5 tokens: ragged_dot on 2 devices (experts split, experts placed) agrees" in out
