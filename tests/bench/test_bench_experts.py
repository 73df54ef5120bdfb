"""`python -m jaxllm.bench.experts --smoke`: the grouped-matmul benchmark's implementations, and its two placements of
experts on 2 devices, agree on the CPU."""

from jaxllm.bench import experts


def test_smoke_implementations_agree(capsys):
    assert experts.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "5 tokens: auto (ragged_dot), sliced, pallas, dense_loop and gathered agree with ragged_dot" in out
    assert "5 tokens: auto on 2 devices (experts split, experts per device) agrees" in out
