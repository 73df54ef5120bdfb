"""Start-up: the step shapes compiled in parallel threads give the tokens of shapes compiled when first met; a
second identical start compiles nothing (every executable is read from the persistent compilation cache, in
a fresh process); the weight loader's host copies keep every bit; $JAXLLM_WARMUP_SHAPES sets how many shapes
start-up compiles."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import pytest
import numpy as np

from engine_helpers import make_engine, random_prompts
from jaxllm.engine.request import SamplingParams
from jaxllm.weight_transfer import assemble, contiguous

REPO = Path(__file__).resolve().parents[2]

# A fresh process builds the engine the test built (same flags, same devices) and reports its compilations.
_START_AGAIN = """
import json, sys
from engine_helpers import make_engine
from jaxllm.engine.startup import compiles
make_engine(sys.argv[1], warmup=None, running_max_req_size=4)
count = compiles()
print(json.dumps({"built": count.built, "read": count.read}))
"""


def _greedy_tokens(engine, prompts):
    with engine:
        streams = engine.submit_many([(p, SamplingParams(max_new_tokens=6, ignore_eos=True), None) for p in prompts])
        return [[e.token_id for e in stream] for stream in streams]


def test_shapes_compiled_in_parallel_at_start_give_the_tokens_of_shapes_compiled_when_met(tiny_model_dir, caplog):
    from jaxllm.bench.startup import COMPILED_SHAPES_LINE

    prompts = random_prompts(seed=31, count=5)
    with caplog.at_level("INFO", logger="jaxllm.engine.runner"):
        parallel = make_engine(tiny_model_dir, warmup=None, running_max_req_size=4)
    startup_set = parallel.runner.warmup_shapes()[1]
    assert len(parallel.runner.shapes_seen) == startup_set  # compiled by the pool
    # The startup bench reads each shape's seconds of lowering and of XLA from the runner's line.
    each = COMPILED_SHAPES_LINE.search("\n".join(caplog.messages))["each"].split(", ")
    assert len(each) == startup_set and all(float(t.split()[1].split("+")[0]) > 0 for t in each)
    met = make_engine(tiny_model_dir, warmup=0, running_max_req_size=4)
    assert not met.runner.shapes_seen
    tokens = _greedy_tokens(parallel, prompts)
    assert tokens == _greedy_tokens(met, prompts)
    assert all(len(t) == 6 for t in tokens) and len({tuple(t) for t in tokens}) > 1


def test_the_shapes_after_the_start_up_set_compile_in_the_background_each_once(tiny_model_dir):
    """compile_later builds the rest of warmup_shapes (here prefills with a row per request) on its own thread
    (told the engine is quiet throughout) while the engine serves 300 two-token prompts at once, whose prefill
    step needs one of them: a step meeting a shape in the build waits for it, so each shape is built once, and
    the tokens are those of prompts alone."""
    import jax.monitoring

    builds = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: builds.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    # (No start-up compiles: the shapes the steps meet compile then, those after the start-up set in the background.)
    engine = make_engine(tiny_model_dir, warmup=0, running_max_req_size=300, max_total_token_num=2048,
                         batch_max_tokens=1024)
    runner = engine.runner
    shapes, startup = runner.warmup_shapes()
    later = {s for s in shapes[startup:] if not s.decode_only}
    assert (1024, 301) in {(s.tokens, s.rows) for s in later} and not runner.compiled_shapes
    prompts = [[int(t) for t in pair] for pair in np.random.default_rng(43).integers(1, 200, size=(300, 2))]
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    builds.clear()
    runner.compile_later(quiet=lambda: True)
    with engine:
        frozen_at_start = gc.get_freeze_count()  # (jaxllm/heap.py)
        together = [[e.token_id for e in s] for s in engine.submit_many([(p, params, None) for p in prompts])]
        runner.stop_compiling_later(finish=True)
        assert gc.get_freeze_count() > frozen_at_start  # the background builds' objects frozen too
        alone = [[e.token_id for e in engine.submit(p, params)] for p in prompts[:3]]
    assert runner.compiled_shapes >= later
    assert len(builds) == len(runner.compiled_shapes)  # each built once (builds and persistent-cache reads alike)
    assert together[:3] == alone and all(len(t) == 2 for t in together)


def test_the_engine_is_quiet_only_after_a_lull_without_work(tiny_model_dir):
    """What the server's background compiles wait for: no work for a while (and a running loop)."""
    import time

    engine = make_engine(tiny_model_dir)
    assert not engine.quiet_for(0)  # not started
    with engine:
        engine.wait_idle(5)
        time.sleep(0.05)
        assert engine.quiet_for(0.05) and not engine.quiet_for(60)
        stream = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=40, ignore_eos=True))
        next(stream)
        assert not engine.quiet_for(0)
        list(stream)
    assert not engine.quiet_for(0)


def test_a_second_identical_start_compiles_nothing(tiny_model_dir):
    make_engine(tiny_model_dir, warmup=None, running_max_req_size=4)  # fills the cache (if a run before had not)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "engine")]))
    run = subprocess.run([sys.executable, "-c", _START_AGAIN, str(tiny_model_dir)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    count = json.loads(run.stdout.strip().splitlines()[-1])
    assert count["built"] == 0 and count["read"] > 5, count  # weights, KV buffers, every start-up step shape


def test_the_loaders_host_copies_keep_every_bit():
    rng = np.random.default_rng(5)
    gate, up = (rng.standard_normal((48, 40), np.float32).astype(ml_dtypes.bfloat16) for _ in range(2))
    fused = assemble((40, 2, 48), [((slice(None), 0), gate.T), ((slice(None), 1), up.T)])
    assert fused.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(fused.view(np.uint16), np.stack([gate.T, up.T], axis=1).view(np.uint16))
    packed = contiguous(gate.T, ml_dtypes.bfloat16)
    assert packed.flags.c_contiguous and np.array_equal(packed.view(np.uint16), gate.T.copy().view(np.uint16))
    wide = rng.standard_normal((16, 24), np.float32)
    np.testing.assert_array_equal(contiguous(wide.T, ml_dtypes.bfloat16), wide.T.astype(ml_dtypes.bfloat16))
    assert np.shares_memory(contiguous(wide, np.float32), wide)  # contiguous already: no copy


def test_phase_lines_are_what_the_startup_bench_reads(caplog):
    """`python -m jaxllm.bench startup` parses the engine core's log: each phase's line, the weights' rate."""
    import jax
    import jax.numpy as jnp

    from jaxllm.bench.startup import format_table
    from jaxllm.engine.startup import LINE, WEIGHTS_LINE, log_weights, phase

    example = jax.ShapeDtypeStruct((7,), jnp.float32)
    with caplog.at_level("INFO", logger="jaxllm.startup"):
        with phase("probe") as timer:
            jax.jit(lambda x: x * 3 + 1).lower(example).compile()
        log_weights({"w": jnp.ones((1000, 250), jnp.float32)}, 0.0005)  # 1 MB in 0.5 ms
    text = "\n".join(caplog.messages)
    match = LINE.search(text)
    assert match["phase"] == "probe" and float(match["seconds"]) == round(timer.seconds, 2)
    assert int(match["built"]) + int(match["read"]) == 1  # compiled, or read from the cache of an earlier run
    assert WEIGHTS_LINE.search(text).groupdict() == {"gb": "0.00", "rate": "2.00"}
    table = format_table({"warm": {"health_s": 2.5, "phases": {"probe": {"seconds": 1.25, "compiled": 0,
                                                                         "from_cache": 3}}, "weights_gb_s": 2.0}})
    assert "probe" in table and "1.25 s" in table and "2.50 s" in table and "2.00" in table


def test_warmup_shapes_come_from_the_environment(monkeypatch):
    from jaxllm.engine.runner import warmup_from_env

    monkeypatch.delenv("JAXLLM_WARMUP_SHAPES", raising=False)
    assert warmup_from_env() is None  # the start-up set
    monkeypatch.setenv("JAXLLM_WARMUP_SHAPES", "0")
    assert warmup_from_env() == 0
    monkeypatch.setenv("JAXLLM_WARMUP_SHAPES", "3")
    assert warmup_from_env() == 3
    monkeypatch.setenv("JAXLLM_WARMUP_SHAPES", "all")
    with pytest.raises(ValueError, match="JAXLLM_WARMUP_SHAPES"):
        warmup_from_env()
