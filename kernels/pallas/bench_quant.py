"""`python -m kernels.pallas.bench --quant`: quantised-weight matmuls side by side, against their limits.

For each Llama-3-8B product shape and row count: the bf16 XLA dot; XLA's dot on weights dequantised outside a
kernel; our kernels (`quant_matmul.py`, and at a few rows the matrix-vector ones of `quant_gemv.py`); jax's
`hopper_mixed_type_matmul_mgpu` (int8 × bf16, Mosaic GPU); XLA's int8 × int8 → int32 and fp8 dots, also split along
the inputs into 2 or 4 parts of one batched GEMM (more output tiles where m × n is small against k: the
down-projection at batch 256). Small row counts are memory-bound: bytes read (weights + scales + activations) over
the measured HBM bandwidth. Large ones are matmul-bound: TFLOP/s (TOPS for int8) over the measured bf16 rate (and
the int8 rate for int8 tensor cores). Our kernels' launches may name their weight conversion (`dequant`: "cast", the
old one, beside "magic", int4's "magicops" and "magic32" (GEMV), int8's "f16"; `parse_launches`); a row appears only
where the kernel takes the conversion.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels.pallas import quant_gemv, quant_matmul, reference, two_digit_matmul

# (name, k, n) of Llama-3-8B's products: fused q/k/v, o, fused gate/up, down.
SHAPES = (("qkv 4096×6144", 4096, 6144), ("o 4096×4096", 4096, 4096), ("gate_up 4096×28672", 4096, 28672),
          ("down 14336×4096", 14336, 4096))
ROWS = (1, 16, 64, 256, 2048)
MEMORY_BOUND_ROWS = 64  # up to this many rows the table reports bytes/s


def int8_rate(n: int, timed) -> float:
    """int8 × int8 → int32 ops/s of XLA's dot on random n×n×n."""
    a = jax.random.randint(jax.random.key(0), (n, n), -127, 127, jnp.int8)
    b = jax.random.randint(jax.random.key(1), (n, n), -127, 127, jnp.int8)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.int32))
    return 2 * n**3 / timed(dot, (a, b), repeats=5, trials=5)


LAYERS = 8  # distinct weights per timed call: more than the L2 holds, and one dispatch for all of them


def _quantised(k: int, n: int, key):
    """Random bf16 weights [k, n] and their int8 / int4 / fp8 forms (plain arrays, no jaxllm types)."""
    w = jax.random.normal(key, (k, n), jnp.float32) * 0.02
    scale8 = jnp.max(jnp.abs(w), axis=0) / 127.0
    w8 = jnp.clip(jnp.round(w / scale8), -127, 127).astype(jnp.int8)
    q4 = jax.random.randint(key, (k, n), 0, 16, jnp.int32)
    shifts = jnp.arange(8, dtype=jnp.uint32) * 4
    packed = jax.lax.bitcast_convert_type(
        jnp.sum(q4.astype(jnp.uint32).reshape(k // 8, 8, n) << shifts[None, :, None], axis=1, dtype=jnp.uint32),
        jnp.int32)
    groups = k // 128
    scale4 = jnp.full((groups, n), 0.003, jnp.bfloat16)
    zero4 = jnp.full((groups, n), 8, jnp.bfloat16)
    scale_f8 = jnp.max(jnp.abs(w), axis=0) / 448.0
    w_f8 = (w / scale_f8).astype(jnp.float8_e4m3fn)
    # int8 and fp8 weights output-major [n, k], as jaxllm stores them; int4 input-major (packed along k)
    return dict(w16=(w.astype(jnp.bfloat16),), w8=(w8.T, scale8), w4=(packed, scale4, zero4), f8=(w_f8.T, scale_f8))


SPLIT_K_PARTS = (2, 4)


def split_k_parts(k: int) -> list[int]:
    """The SPLIT_K_PARTS that split k inputs into parts of whole 128-input tiles."""
    return [parts for parts in SPLIT_K_PARTS if k % (parts * 128) == 0]


def split_k_weights(weights: dict, kind: str) -> tuple:
    """weights[kind], or for "w8k2", "f8k4", ...: the int8 / fp8 weight sets laid out for that split (a layout a
    load could store, so that no timed call moves a weight), made only for the cases that time them."""
    if kind not in weights:
        data, scale = weights[kind[:2]]
        weights[kind] = (tuple(_split_k_layout(d, int(kind[3:])) for d in data), scale)
    return weights[kind]


def _split_k_layout(w_nk, parts: int):
    """w [n, k] → [parts, n, k / parts]: part p holds inputs p·k/parts … (p+1)·k/parts − 1 of every output."""
    n, k = w_nk.shape
    return w_nk.reshape(n, parts, k // parts).transpose(1, 0, 2)


def _split_k_dot(xq, w_split, out_dtype):
    """xq [m, k] @ the split weight [parts, n, k / parts] (its [n, k]ᵀ) as one batched GEMM over the parts, summed:
    `parts` times the output tiles of the plain dot for the same work (a grid that fills more SMs when m × n is
    small against k), at the cost of writing and reading `parts` partial outputs."""
    parts, n, kp = w_split.shape
    x3 = xq.reshape(xq.shape[0], parts, kp)
    partial = jax.lax.dot_general(x3, w_split, (((2,), (2,)), ((1,), (0,))), preferred_element_type=out_dtype)
    return partial.sum(0, dtype=out_dtype)  # [m, n]


def layered(fn, layers: int):
    """One jitted call applying `fn(x, *weights)` to each of `layers` weight sets (tuples of arrays)."""
    return jax.jit(lambda x, stacks: tuple(fn(x, *[a[i] for a in stacks]) for i in range(layers)))


GEMV_BENCH_ROWS = 8  # the matrix-vector kernels are timed up to this many rows (the model: quant_gemv.MAX_ROWS)


def cases(m: int, k: int, n: int, interpret: bool = False, launches=(None,), layers: int = LAYERS,
          gemv_launches=(None,), only=None):
    """(kernel name, jitted fn, args, bytes read, int8 tensor cores?) for one product shape, each call over
    `layers` distinct weights (bytes and times are per product); our kernels once per launch in `launches`
    (`gemv_launches` for the matrix-vector ones; None: the kernel's own choice); `interpret`: only our kernels
    (interpret mode) and the XLA dots; `only`: keep the cases whose name contains one of these strings."""
    per_layer = [_quantised(k, n, jax.random.key(k + n + i)) for i in range(layers)]
    weights = {name: tuple(tuple(d[name][j] for d in per_layer) for j in range(len(per_layer[0][name])))
               for name in per_layer[0]}
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    x_q, x_s = reference.quantize_rows_int8(x)
    act = m * k * 2 + m * n * 2
    b16, b8, b4 = k * n * 2 + act, k * n + n * 4 + act, k * n // 2 + 2 * (k // 128) * n * 2 + act

    def ours(kernel, launch, **kw):
        return functools.partial(kernel, launch=launch, interpret=interpret, **kw)

    # launches resolved at this row count ("auto:magic": the kernel's own choice with that conversion), and
    # only those whose conversion the kernel takes
    tc8, tc4, gemv8, gemv4 = ([_resolve(launch, default) for launch in specs
                               if launch is None or _mode(launch) in modes]
                              for specs, default, modes in (
                                  (launches, quant_matmul.pick_launch(m), quant_matmul.INT8_MODES),
                                  (launches, quant_matmul.pick_launch(m, int4=True), quant_matmul.INT4_MODES),
                                  (gemv_launches, quant_gemv.INT8, quant_gemv.INT8_MODES),
                                  (gemv_launches, quant_gemv.INT4, quant_gemv.INT4_MODES)))
    if m > GEMV_BENCH_ROWS:
        gemv8 = gemv4 = []

    def w8a8_xla(x, w, s):
        xq, xs = reference.quantize_rows_int8(x)
        return reference.int8_int8_matmul(xq, xs, w, s, jnp.bfloat16)

    def w8a8_split(x, w_split, s):
        xq, xs = reference.quantize_rows_int8(x)
        acc = _split_k_dot(xq, w_split, jnp.int32)
        return (acc.astype(jnp.float32) * xs[:, None] * s[None, :]).astype(jnp.bfloat16)

    def w8a8_ours(launch):
        def fn(x, w, s):
            xq, xs = reference.quantize_rows_int8(x)
            return quant_matmul.int8_int8_matmul(xq, xs, w, s, out_dtype=jnp.bfloat16, launch=launch,
                                                 interpret=interpret)
        return fn

    def digits(norm: str, kernel: bool):
        """Two digits of x ("none"), of x after an RMS norm XLA applies first ("applied"), or with the norm
        folded into the digits ("folded"); the digits by XLA's ops or by our kernel."""
        def fn(x, w, s):
            if norm == "none":
                return two_digit_matmul.int8_matmul(x, w, s, digits_kernel=kernel)
            weight = jnp.linspace(0.5, 1.5, x.shape[-1], dtype=jnp.float32)
            if norm == "folded":
                return two_digit_matmul.int8_matmul(x, w, s, weight, 1e-5, digits_kernel=kernel)
            x32 = x.astype(jnp.float32)
            normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5) * weight).astype(x.dtype)
            return two_digit_matmul.int8_matmul(normed, w, s, digits_kernel=kernel)
        return fn

    norm_weight = jnp.linspace(0.5, 1.5, k, dtype=jnp.float32)

    def folded_gemv(launch):
        return lambda x, w, s: quant_gemv.int8_gemv(x, w, s, norm_weight, 1e-5, launch=launch, interpret=interpret)

    def folded_gemv4(launch):
        return lambda x, p, s, z: quant_gemv.int4_gemv(x, p, s, z, norm_weight, 1e-5, launch=launch,
                                                      interpret=interpret)

    table = [
        ("bf16 XLA dot", jnp.dot, "w16", b16, False),
        ("w8a16 XLA dot, dequantised outside", _dequant8, "w8", b8, False),
        ("w8a16 XLA dot, int8 converted in the dot", _convert8, "w8", b8, False),
        ("w8a16 as two int8 digits of int16 x, XLA int8 GEMM", two_digit_matmul.int8_matmul, "w8", b8, False),
        ("w8a16 two digits, digits by our kernel", digits("none", True), "w8", b8, False),
        ("w8a16 two digits of RMS-normed x, norm applied first", digits("applied", False), "w8", b8, False),
        ("w8a16 two digits of RMS-normed x, norm folded in", digits("folded", False), "w8", b8, False),
        ("w8a16 two digits of RMS-normed x, norm folded in, digits by our kernel", digits("folded", True), "w8", b8,
         False),
        *[(f"w8a16 ours (Triton){_describe(launch)}", ours(quant_matmul.int8_matmul, launch), "w8", b8, False)
          for launch in tc8],
        *[(f"w8a16 ours GEMV{_describe(launch)}", ours(quant_gemv.int8_gemv, launch), "w8", b8, False)
          for launch in gemv8],
        *[(f"w8a16 ours GEMV, RMS norm folded in{_describe(launch)}", folded_gemv(launch), "w8", b8, False)
          for launch in gemv8 if m == 1 and (launch or quant_gemv.INT8).dequant == "f16"],
        ("w8a16 hopper_mixed_type_matmul_mgpu", _mgpu_int8(m), "w8", b8, False),
        ("w4a16 XLA dot, dequantised outside", _dequant4, "w4", b4, False),
        *[(f"w4a16 ours (Triton){_describe(launch)}", ours(quant_matmul.int4_matmul, launch), "w4", b4, False)
          for launch in tc4],
        *[(f"w4a16 ours GEMV{_describe(launch)}", ours(quant_gemv.int4_gemv, launch), "w4", b4, False)
          for launch in gemv4],
        *[(f"w4a16 ours GEMV, RMS norm folded in{_describe(launch)}", folded_gemv4(launch), "w4", b4, False)
          for launch in gemv4],
        ("w8a8 XLA int8 dot (+ x quantisation)", w8a8_xla, "w8", b8, True),
        *[(f"w8a8 ours (Triton, + x quantisation){_describe(launch)}", w8a8_ours(launch), "w8", b8, True)
          for launch in launches if launch is None or _mode(launch) == "cast"],
        ("fp8 XLA dot (+ x quantisation)", _fp8_dot, "f8", b8, False),
        ("fp8 XLA dot, bf16 product (+ x quantisation)", functools.partial(_fp8_dot, product=jnp.bfloat16), "f8",
         b8, False),
        *[(f"w8a8 XLA int8 dot split K in {parts} (+ x quantisation)", w8a8_split, f"w8k{parts}", b8, True)
          for parts in split_k_parts(k)],
        *[(f"fp8 XLA dot split K in {parts} (+ x quantisation)", functools.partial(_fp8_dot, split=True), f"f8k{parts}",
           b8, False) for parts in split_k_parts(k)],
    ]
    if interpret:  # (the digits kernel is checked in interpret mode by tests/kernels/test_two_digit_matmul.py)
        table = [case for case in table if not any(w in case[0] for w in ("mgpu", "fp8", "by our kernel"))]
    if only:
        table = [case for case in table if any(word in case[0] for word in only)]
    return [(name, layered(fn, layers), (x, split_k_weights(weights, kind)), bytes_, int8)
            for name, fn, kind, bytes_, int8 in table]


def _dequant8(x, w, s):  # w [n, k]
    return reference.dot_nk(x, (w.astype(jnp.float32) * s[:, None]).astype(jnp.bfloat16), jnp.bfloat16)


def _convert8(x, w, s):  # jaxllm's XLA path: the int8 → bf16 convert is the dot's operand, the scale after it
    return (reference.dot_nk(x, w.astype(jnp.bfloat16), jnp.float32) * s[None, :]).astype(jnp.bfloat16)


def _dequant4(x, p, s, z):
    return jnp.dot(x, reference.dequantize_int4(p, s, z).astype(jnp.bfloat16))


def _describe(launch) -> str:
    if launch is None:
        return ""
    rows = f" m{launch.block_m}" if getattr(launch, "block_m", None) else ""
    return (f"{rows} n{launch.block_n} k{launch.block_k} w{launch.num_warps}/{launch.num_stages}"
            f" p{launch.target_programs} {launch.dequant}")


def _mode(launch) -> str:
    """The conversion a launch spec (a launch, or a conversion for the default sizes) names."""
    return launch if isinstance(launch, str) else launch.dequant


def _resolve(launch, default):
    """A launch spec (None, a launch, or a conversion for `default`'s sizes) → what the kernel is called with."""
    return dataclasses.replace(default, dequant=launch) if isinstance(launch, str) else launch


def parse_launches(text: str, kind=quant_matmul.Launch) -> list:
    """"block_n/block_k/warps/stages/target_programs[/block_m][:dequant],..." → `kind` list; "auto" or "": None
    (the kernels' own choice); "auto:magic": the string "magic" (the kernel's own sizes with that conversion)."""
    out = []
    for item in filter(None, text.split(",")):
        sizes, _, dequant = item.partition(":")
        if sizes == "auto":
            out.append(dequant or None)
            continue
        values = [int(v) for v in sizes.split("/")]
        options = {"dequant": dequant} if dequant else {}
        if len(values) > 5:  # (block_m follows dequant among the fields)
            options["block_m"] = values.pop(5)
        out.append(kind(*values, **options))
    return out or [None]


def parse_gemv_launches(text: str) -> list:
    return parse_launches(text, quant_gemv.GemvLaunch)


def hlo_summary(m: int, k: int, n: int) -> None:
    """Print, for the XLA paths the model takes (w8a16 with the convert in the dot, w8a8, fp8), the custom
    calls and fusions of the compiled product and any transpose / copy of a weight-sized array: whether XLA
    fused the int8 → bf16 convert into its GEMM, and whether it moves the weights every call."""
    import re

    w = _quantised(k, n, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)

    def w8a8(x, w, s):
        xq, xs = reference.quantize_rows_int8(x)
        return reference.int8_int8_matmul(xq, xs, w, s, jnp.bfloat16)

    for name, fn, args in (("w8a16 convert in the dot", _convert8, w["w8"]), ("w8a8", w8a8, w["w8"]),
                           ("fp8", _fp8_dot, w["f8"])):
        text = jax.jit(fn).lower(x, *args).compile().as_text()
        calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
        fusions = sorted(set(re.findall(r'kind=(k\w+)', text) + re.findall(r'"kind":"(__\w+)"', text)))
        big = [line.strip()[:150] for line in text.splitlines()
               if re.search(r"transpose|copy", line) and "parameter(" not in line
               and re.search(rf"\[({k},{n}|{n},{k})\]", line)]
        print(f"HLO {name} {m}×{k}×{n}: custom calls {calls}, fusion kinds {fusions}; weight-sized "
              f"transposes/copies: {big or 'none'}", flush=True)


def _fp8_dot(x, w, scale, product=jnp.float32, split=False):
    """w [n, k] e4m3 (`split`: [parts, n, k / parts], float32 partial sums); `product`: the GEMM's output type."""
    x32 = x.astype(jnp.float32)
    xs = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 448.0
    xq = (x32 / jnp.where(xs > 0, xs, 1.0)).astype(jnp.float8_e4m3fn)
    acc = _split_k_dot(xq, w, jnp.float32) if split else reference.dot_nk(xq, w, product)
    return (acc.astype(jnp.float32) * xs * scale).astype(jnp.bfloat16)


def _mgpu_int8(m: int):
    """jax's Mosaic GPU mixed-type kernel: it takes the int8 operand on the left, so out^T = w^T @ x^T (the
    rows of x padded to its tile)."""
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

    tile = 128  # its column tile (our rows); it asked for a multiple of 2 × the tile (two warpgroups along N)
    config = mixed.TuningConfig(tile_m=128, tile_n=tile, tile_k=64, max_concurrent_steps=4)

    def fn(x, w8_t, scale):  # w8_t [n, k], as jaxllm stores int8 weights
        m_pad = -(-x.shape[0] // (2 * tile)) * 2 * tile
        xt = jnp.pad(x, ((0, m_pad - x.shape[0]), (0, 0))).T  # [k, m_pad]
        out_t = mixed.mixed_matmul_kernel(w8_t, xt, out_dtype=jnp.float32, config=config)  # [n, m_pad]
        return (out_t[:, : x.shape[0]].T * scale[None, :]).astype(jnp.bfloat16)

    return fn


def run(bench, timed, rows=ROWS, shapes=SHAPES, ops8: float | None = None, launches=(None,), layers=LAYERS,
        gemv_launches=(None,), only=None):
    """Add every case's row to `bench` (a kernels.pallas.bench.Bench with the measured limits); `ops8`: the
    int8 dot rate (measured here when not given)."""
    if ops8 is None:
        ops8 = int8_rate(8192, timed)
        print(f"measured: int8 dot {ops8 / 1e12:.0f} TOPS", flush=True)
    for name, k, n in shapes:
        for m in rows:
            for kernel, fn, args, bytes_, int8 in cases(m, k, n, bench.interpret, launches, layers, gemv_launches,
                                                        only):
                label = f"{name}, {m} rows"
                try:
                    seconds = timed(fn, args)
                except Exception as err:  # noqa: BLE001 - a kernel that does not build here is a row, not a stop
                    bench.failed(label, kernel, err)
                    continue
                per_product = seconds / layers
                if m <= MEMORY_BOUND_ROWS:
                    bench._row(label, kernel, "", per_product, bytes_=bytes_)
                else:
                    bench._row(label, kernel, "", per_product, flops=2 * m * k * n, limit=ops8 if int8 else None)
    return bench
