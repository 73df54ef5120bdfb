"""`python -m kernels.pallas.bench`: each attention kernel (`--quant`: each quantised-weight matmul,
`bench_quant.py`; `--latent`: latent attention decode) against its physical limit, medians, one short table.

Decode is memory-bound: its limit is the K/V bytes it must read over HBM bandwidth (the issues' 2.98 TB/s,
and the bandwidth measured in the same run). Prefill is matmul-bound: FLOPs over the bf16 matmul rate.
Times are per call of the whole wrapper (planning, query packing and the split-K combine included).
`--dense`: prefill beside cuDNN's, attention_mgpu's and tokamax's attention on the same dense shapes
(`bench_dense.py`). `--smoke` runs tiny shapes in interpret mode on the CPU (Triton kernel only), to keep this
script working.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels.pallas import (
    attention_mosaic, attention_triton, bench_dense, bench_quant, fresh_prefill, latent_attention, plan, reference,
)
from kernels.pallas.int8_dequant import as_pairs

ISSUE_BANDWIDTH = 2.98e12  # bytes/s: H100 HBM read, measured for the issues (November 2026)


def timed(fn: Callable, args, repeats: int = 20, trials: int = 7) -> float:
    """Median seconds per call: `repeats` asynchronous calls per trial, synchronised at the end."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    per_call = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / repeats)
    return statistics.median(per_call)


def timed_chained(fn: Callable, args, copies: int, repeats: int = 5, trials: int = 7) -> float:
    """Median seconds per call of `fn(q, *rest)` with `copies` calls chained in one jitted program (each call's q
    nudged by the one before's output, so none can be hoisted or merged): the host launches one program, so a
    kernel faster than a Python call's dispatch is timed on the device, as it runs inside an engine step."""

    def chain(q, *rest):
        for _ in range(copies):
            out = fn(q, *rest)
            q = (q.astype(jnp.float32) + 1e-7 * out.astype(jnp.float32)).astype(q.dtype)
        return q

    return timed(jax.jit(chain), args, repeats, trials) / copies


def hbm_bandwidth(gib: float) -> float:
    """Read bandwidth: a float32-accumulated sum over `gib` GiB of bf16."""
    x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
    seconds = timed(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), (x,), repeats=5, trials=5)
    return x.size * 2 / seconds


def matmul_rate(n: int) -> float:
    """bf16 matmul FLOP/s on random n×n×n."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    return 2 * n**3 / timed(jax.jit(jnp.matmul), (a, b), repeats=5, trials=5)


def make_table(rows: int, length: int, width: int, contiguous: bool, seed: int) -> np.ndarray:
    """Slot table of `rows` rows of `length` keys each over rows × length slots (scratch slot after them)."""
    total = rows * length
    slots = np.arange(total) if contiguous else np.random.default_rng(seed).permutation(total)
    table = np.full((rows, width), total, np.int32)
    table[:, :length] = slots.reshape(rows, length)
    return table


def random_cache(slots: int, kv_heads: int, head_dim: int, dtype, seed: int, int8: bool = False, launch=None):
    """Random K/V buffers (int8 ones quantised and stored as `launch.dequant` wants them, with their scales as
    kernel keyword arguments)."""
    rows = attention_mosaic.cache_rows(slots)
    k = jax.random.normal(jax.random.key(seed), (rows, kv_heads, head_dim), dtype)
    v = jax.random.normal(jax.random.key(seed + 1), (rows, kv_heads, head_dim), dtype)
    if not int8:
        return k, v, {}
    (k, k_scale), (v, v_scale) = reference.quantize_kv(k), reference.quantize_kv(v)
    if launch.dequant == "pairs":
        k, v = as_pairs(k), as_pairs(v)
    return k, v, dict(k_scale=k_scale, v_scale=v_scale)


class Bench:
    def __init__(self, bandwidth: float, flops: float, interpret: bool, chained: int = 0, only=None):
        self.bandwidth, self.flops, self.interpret, self.rows = bandwidth, flops, interpret, []
        self.chained = chained  # > 0: decode and prefill rows timed as that many calls in one program
        self.only = only  # case names to run (None: all)

    def time(self, fn, args, repeats: int = 20) -> float:
        return timed_chained(fn, args, self.chained) if self.chained else timed(fn, args, repeats=repeats)

    def decode(self, name, impl, batch, context, heads, kv_heads, head_dim, *, contiguous=True, int8=False,
               split="auto", splits=None, launch=None):
        dtype = jnp.bfloat16
        width = -(-context // 64) * 64
        if launch is None:
            long = attention_triton.DECODE_INT8 if int8 else attention_triton.DECODE
            launch = attention_triton.decode_launch(width, batch * kv_heads, long)
        block_k = attention_mosaic.BLOCK_K if impl == "mosaic" else launch.block_k
        slots = batch * context
        k, v, scales = random_cache(slots, kv_heads, head_dim, dtype, seed=batch + context, int8=int8, launch=launch)
        table = jnp.asarray(make_table(batch, context, width, contiguous, seed=batch))
        q = jax.random.normal(jax.random.key(7), (batch, heads, head_dim), dtype)
        positions = jnp.full((batch,), context - 1, jnp.int32)
        if splits is None:
            splits = plan.decode_splits(batch * kv_heads, width, block_k, split)
        blocks = plan.decode_blocks(batch)
        if impl == "mosaic":
            fn = jax.jit(lambda q, k, v, p, t: attention_mosaic.paged_attention(
                q, k, v, p, t, blocks, scale=0.088, splits=splits))
        else:
            fn = jax.jit(lambda q, k, v, p, t, s: attention_triton.paged_attention(
                q, k, v, p, t, blocks, scale=0.088, block_q=1, block_k=block_k, splits=splits,
                num_warps=launch.num_warps, num_stages=launch.num_stages, owns_all_tokens=True,
                interpret=self.interpret, dequant=launch.dequant, **s))
        args = (q, k, v, positions, table) + (() if impl == "mosaic" else (scales,))
        seconds = self.time(fn, args)
        kv_bytes = 2 * k.size // k.shape[0] * slots * jnp.dtype(k.dtype).itemsize
        if int8:
            kv_bytes += 2 * slots * kv_heads * 4
        config = f"split {splits}" + ("" if impl == "mosaic" else f", {_describe(launch, True, int8)}")
        config += ", contiguous" if contiguous else ", scattered"
        self._row(name, impl, config, seconds, bytes_=kv_bytes)

    def prefill(self, name, impl, rows, new, cached, heads, kv_heads, head_dim, *, int8=False, launch=None,
                own_keys=False, fresh=None):
        """`own_keys` (int8): the engine's int8 prefill, fresh_prefill.py, in one launch at `fresh` (default
        PREFILL_INT8): the new tokens' keys from the step's arrays in 16 bits, the cached prefix read with
        `launch`'s dequant mode."""
        dtype = jnp.bfloat16
        launch = launch or (attention_triton.PREFILL_INT8 if int8 else attention_triton.PREFILL)
        length = new + cached
        k, v, scales = random_cache(rows * length, kv_heads, head_dim, dtype, seed=3, int8=int8, launch=launch)
        width = -(-length // 64) * 64
        table = jnp.asarray(make_table(rows, length, width, True, seed=rows))
        n = rows * new
        q = jax.random.normal(jax.random.key(8), (n, heads, head_dim), dtype)
        positions = jnp.asarray(np.tile(np.arange(cached, length), rows), jnp.int32)
        starts = jnp.arange(rows, dtype=jnp.int32) * new
        lens = jnp.full((rows,), new, jnp.int32)
        fresh = fresh or attention_triton.PREFILL_INT8
        if own_keys:
            k_new, v_new = (jax.random.normal(jax.random.key(seed), (n, kv_heads, head_dim), dtype) for seed in (5, 6))
            fn = jax.jit(lambda q, kn, vn, k, v, p, st, ln, t, s: fresh_prefill.prefill_attention(
                q, kn, vn, k, v, s["k_scale"], s["v_scale"], p, st, ln, t, scale=0.088,
                launch=fresh, dequant=launch.dequant, interpret=self.interpret))
            args = (q, k_new, v_new, k, v, positions, starts, lens, table, scales)
        else:
            fn, args = bench_dense.paged_prefill(impl, launch, self.interpret, 0.088, q, k, v, positions, table,
                                                 starts, lens, scales)
        seconds = self.time(fn, args, repeats=5)
        flops = bench_dense.prefill_flops(rows, new, cached, heads, head_dim)
        config = "" if impl == "mosaic" else _describe(launch, False, int8)
        if own_keys:
            config = f"own keys 16-bit, one launch: {_describe(fresh, False)}, {launch.dequant}"
        self._row(name, impl, config, seconds, flops=flops)

    def latent(self, name, impl, batch, context, heads=16, kv_rank=512, rope_dim=64, launch=None):
        """Latent attention decode (DeepSeek-V2-Lite: 16 heads, 512 + 64 cached per token): the kernel
        (impl "triton") or the plain-JAX form ("reference"), against the cached rows' bytes."""
        dtype, dim = jnp.bfloat16, kv_rank + rope_dim
        launch = launch or attention_triton.Launch(block_k=32, num_warps=4, num_stages=2)
        slots = batch * context
        cache = jax.random.normal(jax.random.key(5), (slots + 1, 1, dim), dtype)
        width = -(-context // 64) * 64
        table = jnp.asarray(make_table(batch, context, width, False, seed=batch))
        q = jax.random.normal(jax.random.key(6), (batch, heads, dim), dtype)
        positions = jnp.full((batch,), context - 1, jnp.int32)
        head_block = plan.pow2_divisor(heads, latent_attention.HEAD_BLOCK, 1)
        splits = plan.decode_splits(batch * (heads // head_block), width, launch.block_k, "auto")
        if impl == "reference":
            fn = jax.jit(lambda q, c, p, t: reference.latent_attention(q, c, jnp.arange(batch), p, t, 0.07, kv_rank))
            config = "plain JAX"
        else:
            fn = jax.jit(lambda q, c, p, t: latent_attention.latent_attention(
                q, c, p, t, plan.decode_blocks(batch), kv_rank=kv_rank, scale=0.07, block_q=1,
                block_k=launch.block_k, splits=splits, head_block=head_block, num_warps=launch.num_warps,
                num_stages=launch.num_stages, interpret=self.interpret))
            config = f"split {splits}, {_describe(launch, True)}, scattered"
        seconds = timed(fn, (q, cache, positions, table))
        self._row(name, impl, config, seconds, bytes_=slots * dim * jnp.dtype(dtype).itemsize)

    def guarded(self, method: str, *args, **kwargs):
        """Run one case; a failure (a kernel that does not build here, say) is reported as a row, not raised."""
        if self.only is not None and args[0] not in self.only:
            return
        try:
            getattr(self, method)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - report and go on to the next case
            self.failed(args[0], args[1], err)

    def failed(self, name, impl, err: Exception):
        first_line = str(err).splitlines()[0][:160] if str(err) else ""
        self.note(name, impl, "FAILED", f"{type(err).__name__}: {first_line}")

    def note(self, name, impl, status: str, message: str):
        """A row without a measurement: `status` (FAILED, SKIPPED) and why."""
        print(f"{status} {name} {impl}: {message}", flush=True)
        self.rows.append((name, impl, status, "-", "-", message.replace("|", "/")))

    def _row(self, name, impl, config, seconds, bytes_=None, flops=None, limit=None):
        """One result: `bytes_` read (against the bandwidth) or `flops` (against `limit`, default the bf16
        matmul rate)."""
        if bytes_ is not None:
            rate = f"{bytes_ / seconds / 1e12:.2f} TB/s"
            issue, run = bytes_ / ISSUE_BANDWIDTH / seconds, bytes_ / self.bandwidth / seconds
            ratio = f"{issue:.2f} of 2.98 TB/s ({run:.2f} of run's)"
        else:
            rate = f"{flops / seconds / 1e12:.0f} TFLOP/s"
            ratio = f"{flops / (limit or self.flops) / seconds:.2f} of run's " + ("int8 dot" if limit else "matmul")
        row = (name, impl, config, f"{seconds * 1e6:.1f}", rate, ratio)
        self.rows.append(row)
        print(" | ".join(row), flush=True)

    def table(self) -> str:
        head = ("case", "kernel", "config", "median µs", "rate", "of limit")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def run(args) -> Bench:
    if args.smoke:
        bench = Bench(bandwidth=ISSUE_BANDWIDTH, flops=700e12, interpret=True, chained=args.chained)
        small = attention_triton.Launch(block_k=32, num_warps=4, num_stages=2, rows=16)
        bench.guarded("decode", "decode smoke", "triton", 2, 128, 8, 2, 64, launch=small)
        bench.guarded("decode", "decode int8 smoke", "triton", 2, 128, 8, 2, 64, int8=True, split="always",
                      launch=attention_triton.Launch(32, 4, 2, dequant="pairs"))
        bench.guarded("prefill", "prefill smoke", "triton", 1, 32, 16, 8, 2, 64, launch=small)
        bench.guarded("prefill", "prefill int8 smoke, own keys 16-bit", "triton", 2, 32, 16, 8, 2, 64, int8=True,
                      own_keys=True, launch=attention_triton.Launch(32, 4, 2, rows=16, dequant="pairs"))
        bench.guarded("latent", "latent decode smoke", "triton", 2, 64, heads=4, kv_rank=32, rope_dim=16,
                      launch=small)
        bench_quant.run(bench, timed, rows=(3,), shapes=(("quant smoke 256×64", 256, 64),), ops8=1e12,
                        layers=1)
        return bench_dense.run(bench, timed, _describe, smoke=True)
    if args.dense:  # matmul-bound only: no bandwidth to measure
        flops = matmul_rate(8192)
        print(f"measured: bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
        return bench_dense.run(Bench(ISSUE_BANDWIDTH, flops, interpret=False), timed, _describe)
    bandwidth, flops = hbm_bandwidth(4), matmul_rate(8192)
    print(f"measured: HBM read {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    bench = Bench(bandwidth, flops, interpret=False, chained=args.chained, only=args.only)
    if args.quant:
        shapes = [s for s in bench_quant.SHAPES if not args.quant_shapes or s[0].split()[0] in args.quant_shapes]
        if args.quant_hlo:
            for _, k, n in shapes:
                for m in args.quant_rows:
                    bench_quant.hlo_summary(m, k, n)
        return bench_quant.run(bench, timed, rows=args.quant_rows, shapes=shapes, launches=args.quant_launches,
                               gemv_launches=args.quant_gemv_launches, only=args.quant_only)
    if args.latent:
        for batch, context in ((1, 32768), (64, 4096)):
            for impl in ("triton", "reference"):
                bench.guarded("latent", f"latent decode b{batch} ctx{context}", impl, batch, context)
        return bench
    llama8b = dict(heads=32, kv_heads=8, head_dim=128)
    for impl in args.impl:
        if impl == "mosaic":
            bench.guarded("decode", "decode b64 ctx4096", "mosaic", 64, 4096, **llama8b)
            bench.guarded("decode", "decode b64 ctx4096", "mosaic", 64, 4096, contiguous=False, **llama8b)
            bench.guarded("decode", "decode b1 ctx32768", "mosaic", 1, 32768, **llama8b)
            bench.guarded("decode", "decode b256 ctx129", "mosaic", 256, 129, contiguous=False, **llama8b)
            bench.guarded("prefill", "prefill 1×4096", "mosaic", 1, 4096, 0, **llama8b)
            bench.guarded("prefill", "prefill 8×512 after 3584", "mosaic", 8, 512, 3584, **llama8b)
            continue
        for launch in args.decode_configs:
            bench.guarded("decode", "decode b64 ctx4096", "triton", 64, 4096, launch=launch, **llama8b)
        bench.guarded("decode", "decode b64 ctx4096", "triton", 64, 4096, contiguous=False, **llama8b)
        # the offline workload's decode (512 × (128 in / 128 out): a mean context of 192), its keys scattered as
        # 512 requests decoding together leave them
        for launch in args.decode_configs:
            bench.guarded("decode", "decode b512 ctx192", "triton", 512, 192, contiguous=False, launch=launch,
                          **llama8b)
        # bench.step's batch-256 decode at context 128 (jaxllm.bench.step --batch 256 --context 128)
        for launch in args.decode_configs:
            bench.guarded("decode", "decode b256 ctx129", "triton", 256, 129, contiguous=False, launch=launch,
                          **llama8b)
        bench.guarded("decode", "decode b1 ctx32768", "triton", 1, 32768, split="never", **llama8b)
        for splits in args.b1_splits:
            bench.guarded("decode", "decode b1 ctx32768", "triton", 1, 32768, splits=splits, **llama8b)
        for launch in args.int8_configs:
            bench.guarded("decode", "decode int8 b64 ctx4096", "triton", 64, 4096, int8=True, launch=launch,
                          **llama8b)
        bench.guarded("decode", "decode int8 b64 ctx4096", "triton", 64, 4096, int8=True, contiguous=False,
                      **llama8b)
        bench.guarded("decode", "decode int8 b64 ctx4096", "triton", 64, 4096, int8=True, splits=2, **llama8b)
        # the short contexts above, int8 (decode_launch's short rule: DECODE_INT8's 128-key blocks, tuned at 4,096
        # keys, leave the last of a 129-key row's two blocks nearly empty)
        for launch in args.int8_configs:
            for batch, context in ((512, 192), (256, 129)):
                bench.guarded("decode", f"decode int8 b{batch} ctx{context}", "triton", batch, context, int8=True,
                              contiguous=False, launch=launch, **llama8b)
        for launch in args.int8_b1_configs:
            for splits in args.b1_splits:
                bench.guarded("decode", "decode int8 b1 ctx32768", "triton", 1, 32768, int8=True, splits=splits,
                              launch=launch, **llama8b)
        for launch in args.prefill_configs:
            bench.guarded("prefill", "prefill 1×4096", "triton", 1, 4096, 0, launch=launch, **llama8b)
        bench.guarded("prefill", "prefill 8×512 after 3584", "triton", 8, 512, 3584, **llama8b)
        for launch in args.int8_prefill_configs:
            bench.guarded("prefill", "prefill int8 1×4096", "triton", 1, 4096, 0, int8=True, launch=launch,
                          **llama8b)
        bench.guarded("prefill", "prefill int8 8×512 after 3584", "triton", 8, 512, 3584, int8=True, **llama8b)
        # The engine's int8 prefill (fresh_prefill.py): the same shapes, the new tokens' keys through 16 bits.
        for fresh in args.fresh_configs:
            bench.guarded("prefill", "prefill int8 1×4096", "triton", 1, 4096, 0, int8=True, own_keys=True,
                          fresh=fresh, **llama8b)
            bench.guarded("prefill", "prefill int8 8×512 after 3584", "triton", 8, 512, 3584, int8=True,
                          own_keys=True, fresh=fresh, **llama8b)
    return bench


def _describe(launch, decode: bool, int8: bool = False) -> str:
    text = f"block_k {launch.block_k}, warps {launch.num_warps}/{launch.num_stages}"
    text += f", dequant {launch.dequant}" if int8 else ""
    if decode:
        return text
    text += ", mask on the diagonal blocks only" if launch.diagonal_mask else ""
    return f"rows {launch.rows}, {text}"


def _launches(text: str) -> list:
    """"block_k/warps/stages[/rows][:dequant][:diag],..." → Launch list (dequant: one of int8_dequant.MODES,
    default "cast"; diag: prefill's causal mask only on the diagonal key blocks); "" → [None] (the kernel's
    tuned default)."""
    out = []
    for item in filter(None, text.split(",")):
        sizes, *options = item.split(":")
        values = [int(x) for x in sizes.split("/")]
        extra = {"diagonal_mask": True} if "diag" in options else {}
        extra.update({"dequant": o for o in options if o != "diag"})
        out.append(attention_triton.Launch(*values[:3], *values[3:], **extra))
    return out or [None]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", nargs="+", default=["triton", "mosaic"], choices=["triton", "mosaic"])
    parser.add_argument("--decode-configs", type=_launches, default=[None],
                        help="block_k/warps/stages,... for a Triton decode sweep (default: the tuned one)")
    parser.add_argument("--prefill-configs", type=_launches, default=[None],
                        help="block_k/warps/stages/rows,... for a Triton prefill sweep")
    parser.add_argument("--int8-configs", type=_launches, default=[None],
                        help="block_k/warps/stages[:dequant],... for a Triton int8 decode sweep at batch 64 "
                        "(dequant: kernels/pallas/int8_dequant.py's modes)")
    parser.add_argument("--int8-b1-configs", type=_launches, default=[None],
                        help="block_k/warps/stages[:dequant],... for int8 decode at batch 1, each with --b1-splits")
    parser.add_argument("--fresh-configs", type=_launches, default=[None],
                        help="block_k/warps/stages/rows[:diag],... for the engine's int8 prefill (fresh_prefill.py: "
                        "own keys in 16 bits, the prefix int8, one launch; default: PREFILL_INT8's)")
    parser.add_argument("--int8-prefill-configs", type=_launches, default=[None],
                        help="block_k/warps/stages/rows[:dequant],... for a Triton int8 prefill sweep (1×4096)")
    parser.add_argument("--b1-splits", type=lambda t: [int(x) for x in t.split(",")], default=[None],
                        help="key splits to try for batch-1 decode (default: the heuristic's)")
    parser.add_argument("--chained", type=int, default=0, metavar="K",
                        help="time each decode and prefill row as K calls chained in one jitted program (device "
                        "time, no per-call dispatch), instead of calls from Python")
    parser.add_argument("--only", type=lambda t: t.split(","), default=None, metavar="CASE,...",
                        help="run only the attention cases of these names (e.g. \"prefill 1×4096,decode b64 ctx4096\")")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    parser.add_argument("--dense", action="store_true",
                        help="prefill on dense shapes: ours beside cuDNN, attention_mgpu and tokamax (bench_dense.py)")
    parser.add_argument("--latent", action="store_true",
                        help="latent attention decode (DeepSeek-V2-Lite sizes) instead of the other kernels")
    parser.add_argument("--quant", action="store_true",
                        help="the quantised-weight matmuls (bench_quant.py) instead of attention")
    parser.add_argument("--quant-launches", type=bench_quant.parse_launches, default=[None],
                        help="block_n/block_k/warps/stages/target_programs,... (or auto) for our quantised matmuls")
    parser.add_argument("--quant-gemv-launches", type=bench_quant.parse_gemv_launches, default=[None],
                        help="block_n/block_k/warps/stages/target_programs,... (or auto) for the matrix-vector "
                        "kernels (quant_gemv.py)")
    parser.add_argument("--quant-only", type=lambda t: t.split(","), default=None,
                        help="only the quantised-matmul cases whose name contains one of these (comma-separated)")
    parser.add_argument("--quant-hlo", action="store_true",
                        help="print the compiled XLA paths' custom calls, fusions and weight transposes first")
    parser.add_argument("--quant-rows", type=lambda t: [int(x) for x in t.split(",")], default=bench_quant.ROWS,
                        help="row counts of the quantised matmuls")
    parser.add_argument("--quant-shapes", type=lambda t: t.split(","), default=None,
                        help="which Llama-3-8B products (qkv,gate_up,down; default all)")
    bench = run(parser.parse_args(argv))
    print(f"\n{jax.devices()[0].device_kind}, JAX {jax.__version__}\n{bench.table()}")


if __name__ == "__main__":
    main()
