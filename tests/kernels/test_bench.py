"""`python -m kernels.pallas.bench --smoke`: the benchmark script runs (tiny shapes, interpret mode) and
prints one row per case."""

from __future__ import annotations

from kernels.pallas import bench


def test_bench_smoke(capsys):
    bench.main(["--smoke", "--chained", "2"])  # attention rows as 2 calls chained in one program
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "smoke" in line]
    # 5 attention (int8 prefill with its own keys through 16 bits among them), 15 quantised matmuls (our digits
    # kernel's rows left out; at 3 rows the int4 GEMV's folded norm, not the int8 one's; w8a8 split K in 2: 256
    # inputs hold two parts of 128, not four), 4 dense prefill (ours through the cache, jax.nn's XLA form, the splits)
    assert len(rows) == 5 + 15 + 4 and not any("FAILED" in row or "MISMATCH" in row for row in rows)


def test_quant_launches_name_their_conversion():
    """`--quant-launches auto,auto:magic,...`: the kernels' own sizes with each conversion, one row each, and
    only for the kernels that take that conversion."""
    from kernels.pallas import bench_quant

    launches = bench_quant.parse_launches("auto,auto:magic,auto:f16,32/128/4/2/64:magic")
    gemv = bench_quant.parse_gemv_launches("auto,auto:magic32")
    assert launches[:3] == [None, "magic", "f16"] and launches[3].dequant == "magic" and launches[3].block_n == 32
    names = [case[0] for case in bench_quant.cases(1, 256, 64, interpret=True, launches=launches, layers=1,
                                                   gemv_launches=gemv, only=["ours"])]
    assert sum("w8a16 ours (Triton)" in name for name in names) == 4  # cast, magic, f16, sized magic
    assert sum("w4a16 ours (Triton)" in name for name in names) == 3  # int4 has no "f16"
    assert [name for name in names if "GEMV" in name] == [
        "w8a16 ours GEMV", "w8a16 ours GEMV, RMS norm folded in",  # int8 has no "magic32"
        "w4a16 ours GEMV", "w4a16 ours GEMV n128 k256 w4/3 p528 magic32",
        "w4a16 ours GEMV, RMS norm folded in", "w4a16 ours GEMV, RMS norm folded in n128 k256 w4/3 p528 magic32"]
    assert sum("w8a8 ours" in name for name in names) == 1


def test_split_k_products_equal_the_plain_ones():
    """The split-K rows' batched GEMM over [parts, n, k / parts] weights sums to the plain product: int8 × int8
    exactly (int32), fp8 to float32 rounding."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels.pallas import bench_quant

    m, k, n = 5, 512, 48
    one_layer = bench_quant._quantised(k, n, jax.random.key(3))
    weights = {name: ((one_layer[name][0],), (one_layer[name][1],)) for name in ("w8", "f8")}  # as cases() holds them
    xq = jax.random.randint(jax.random.key(4), (m, k), -127, 128, jnp.int8)
    plain = np.asarray(jnp.dot(xq, weights["w8"][0][0].T, preferred_element_type=jnp.int32))
    assert bench_quant.split_k_parts(k) == list(bench_quant.SPLIT_K_PARTS) and bench_quant.split_k_parts(256) == [2]
    for parts in bench_quant.SPLIT_K_PARTS:
        (split,), scale = bench_quant.split_k_weights(weights, f"w8k{parts}")
        assert split.shape == (parts, n, k // parts) and scale is weights["w8"][1]  # the scales are shared
        np.testing.assert_array_equal(np.asarray(bench_quant._split_k_dot(xq, split, jnp.int32)), plain)
        x = jax.random.normal(jax.random.key(parts), (m, k), jnp.bfloat16)
        expected = bench_quant._fp8_dot(x, weights["f8"][0][0], weights["f8"][1][0])
        (split8,), (scale8,) = bench_quant.split_k_weights(weights, f"f8k{parts}")
        got = bench_quant._fp8_dot(x, split8, scale8, split=True)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=2e-2, atol=1e-3)


def test_quant_launches_may_name_the_rows_per_program():
    """A sixth size is the int8 × int8 / weight-only kernels' rows per program (block_m), which the default
    rounds from the row count; the product is the same with it."""
    import jax
    import jax.numpy as jnp

    from kernels.pallas import bench_quant, quant_matmul, reference

    launch, = bench_quant.parse_launches("128/128/4/3/264/64")
    assert (launch.block_n, launch.block_k, launch.num_warps, launch.num_stages, launch.target_programs,
            launch.block_m) == (128, 128, 4, 3, 264, 64)
    assert bench_quant.parse_launches("64/128/4/3/1:magic")[0].block_m is None
    x = jax.random.normal(jax.random.key(0), (256, 256), jnp.bfloat16)
    w = jax.random.randint(jax.random.key(1), (256, 256), -127, 128, jnp.int8)
    scale = jax.random.uniform(jax.random.key(2), (256,), jnp.float32, 1e-3, 1e-2)
    xq, xs = reference.quantize_rows_int8(x)
    want = reference.int8_int8_matmul(xq, xs, w, scale, jnp.float32)
    got = quant_matmul.int8_int8_matmul(xq, xs, w, scale, out_dtype=jnp.float32, launch=launch, interpret=True)
    assert jnp.allclose(got, want, rtol=1e-5, atol=1e-5)
